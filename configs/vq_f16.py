"""VQ-f16 (`models/first_stage_models/vq-f16`): 16x16x8 latents, 16384 codes, attention at 16 px."""
from configs import base_autoencoder


def get_config():
    c = base_autoencoder.get_config()
    m = c.model
    m.target, m.embed_dim, m.n_embed = "vq", 8, 16384
    m.ddconfig.update(dict(double_z=False, z_channels=8, ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,)))
    m.loss.update(dict(disc_start=250001, disc_weight=0.75, disc_num_layers=2, codebook_weight=1.0))
    c.data.batch_size = 14
    return c
