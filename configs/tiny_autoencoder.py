"""A tiny KL autoencoder for tests and smoke runs (no LPIPS; GAN from step 2)."""
from configs import base_autoencoder


def get_config():
    c = base_autoencoder.get_config()
    c.model.embed_dim = 3
    c.model.ddconfig.update(dict(z_channels=3, resolution=16, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1))
    c.model.loss.update(dict(disc_start=2, perceptual_weight=0.0, disc_num_layers=2))
    c.data.update(dict(size=16, batch_size=8, num_workers=0, random_crop=False))
    c.optim.lr = 1e-3
    c.train.update(dict(steps=4, log_every=1, ckpt_every=2, sample_every=4))
    c.mesh.fsdp_min_size = 1024
    return c
