"""The demo's first stage: a small KL-f4 autoencoder on the built-in 32x32 `shapes` (8x8x4 latents).

L1 + KL only: no LPIPS (its weights are a download) and no GAN (flat-coloured shapes do not need
one). `python train.py --config=configs/shapes_autoencoder.py` trains it alone; the demo LDM configs
train it first, into `workdir/shapes_autoencoder`, when it is not there yet.
"""
from configs import base_autoencoder


def get_config():
    c = base_autoencoder.get_config()
    c.name = "shapes_autoencoder"
    c.model.embed_dim = 4
    c.model.ddconfig.update(dict(z_channels=4, resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1))
    # kl_weight 0: at a few hundred steps the KL term only slows reconstruction; scale_by_std in the
    # LDM configs normalises the latents instead
    c.model.loss.update(dict(disc_start=10 ** 9, disc_weight=0.0, perceptual_weight=0.0, kl_weight=0.0,
                             disc_num_layers=2))
    c.data.update(dict(source="shapes", size=32, num_examples=4096, random_crop=False, random_flip=False,
                       batch_size=8, num_workers=0))
    c.optim.lr = 1e-3
    c.train.update(dict(steps=400, log_every=20, ckpt_every=200, sample_every=200))
    c.mesh.fsdp_min_size = 2 ** 20
    return c
