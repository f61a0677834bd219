"""`configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml` (= models/ldm/lsun_beds256): unconditional
LSUN bedrooms 256 (centre crop, as ldm/data/lsun.py), batch 48, base lr 2e-6."""
from configs import ldm_vq4_uncond


def get_config():
    return ldm_vq4_uncond.get_config()  # same shape, data and optimizer as CelebA-HQ
