"""VQ-f4 (`models/first_stage_models/vq-f4`): 64x64x3 latents, 8192 codes, no attention outside the
middle block; taming's VQLPIPSWithDiscriminator. The first stage of most released LDMs."""
from configs import base_autoencoder


def get_config():
    c = base_autoencoder.get_config()
    m = c.model
    m.target, m.embed_dim, m.n_embed = "vq", 3, 8192
    m.ddconfig.update(dict(double_z=False, z_channels=3, ch_mult=(1, 2, 4), attn_resolutions=()))
    m.loss.update(dict(disc_start=0, disc_weight=0.75, codebook_weight=1.0))
    c.data.batch_size = 8
    return c
