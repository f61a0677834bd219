"""VQ-f8 (`models/first_stage_models/vq-f8`): 32x32x4 latents, 16384 codes, attention at 32 px; a
2-layer discriminator. The first stage of cin-ldm-vq-f8."""
from configs import base_autoencoder


def get_config():
    c = base_autoencoder.get_config()
    m = c.model
    m.target, m.embed_dim, m.n_embed = "vq", 4, 16384
    m.ddconfig.update(dict(double_z=False, z_channels=4, ch_mult=(1, 2, 2, 4), attn_resolutions=(32,)))
    m.loss.update(dict(disc_start=1, disc_weight=0.6, disc_num_layers=2, codebook_weight=1.0))
    c.data.batch_size = 10
    return c
