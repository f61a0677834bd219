"""`configs/latent-diffusion/celebahq-ldm-vq-4.yaml` (= models/ldm/celeba256): unconditional
CelebA-HQ 256, batch 48, base lr 2e-6."""
from configs import ldm_vq4_uncond


def get_config():
    return ldm_vq4_uncond.get_config()  # the shared shape is exactly this model's
