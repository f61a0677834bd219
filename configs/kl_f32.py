"""KL-f32 (`models/first_stage_models/kl-f32`, = configs/autoencoder/autoencoder_kl_8x8x64):
8x8x64 latents, attention at 16 and 8 px."""
from configs import base_autoencoder


def get_config():
    c = base_autoencoder.get_config()
    c.model.embed_dim = 64
    c.model.ddconfig.update(dict(z_channels=64, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16, 8)))
    c.data.batch_size = 6  # released model (the configs/autoencoder YAML: ImageNet-SR, 12 x accumulate 2)
    return c
