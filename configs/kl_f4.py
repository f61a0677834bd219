"""KL-f4 (`models/first_stage_models/kl-f4`, = configs/autoencoder/autoencoder_kl_64x64x3): 64x64x3."""
from configs import base_autoencoder


def get_config():
    c = base_autoencoder.get_config()
    c.model.embed_dim = 3
    c.model.ddconfig.update(dict(z_channels=3, ch_mult=(1, 2, 4), attn_resolutions=()))
    c.data.batch_size = 10  # released model (the configs/autoencoder YAML: ImageNet-SR, 12 x accumulate 2)
    return c
