"""KL-f8 (`models/first_stage_models/kl-f8`, = configs/autoencoder/autoencoder_kl_32x32x4):
32x32x4 latents, no attention outside the middle block. The first stage of txt2img and churches."""
from configs import base_autoencoder


def get_config():
    c = base_autoencoder.get_config()  # the base is KL-f8's shape and loss
    c.data.batch_size = 4  # released model (the configs/autoencoder YAML: ImageNet-SR, 12 x accumulate 2)
    return c
