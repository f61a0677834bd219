"""`configs/latent-diffusion/ffhq-ldm-vq-4.yaml` (= models/ldm/ffhq256): unconditional FFHQ 256,
batch 42, base lr 2e-6."""
from configs import ldm_vq4_uncond


def get_config():
    c = ldm_vq4_uncond.get_config()
    c.data.batch_size = 42
    return c
