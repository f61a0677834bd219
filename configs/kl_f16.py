"""KL-f16 (`models/first_stage_models/kl-f16`, = configs/autoencoder/autoencoder_kl_16x16x16):
16x16x16 latents, attention at 16 px."""
from configs import base_autoencoder


def get_config():
    c = base_autoencoder.get_config()
    c.model.embed_dim = 16
    c.model.ddconfig.update(dict(z_channels=16, ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,)))
    c.data.batch_size = 6  # released model (the configs/autoencoder YAML: ImageNet-SR, 12 x accumulate 2)
    return c
