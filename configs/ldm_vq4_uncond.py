"""The unconditional LDM-4 shape shared by CelebA-HQ, FFHQ and LSUN bedrooms (274.1M UNet):
VQ-f4 latents 64x64x3, model_channels 224, channel_mult [1,2,3,4], attention at ds 8,4,2 (8/16/32 px),
32 channels per head. As it stands this is `celebahq-ldm-vq-4`.

optim.lr is the YAML's base_learning_rate. CompVis main.py multiplies it by
accumulate x n_gpu x batch_size (--scale_lr True, the default); our loop uses optim.lr as it is, so pass
the product (--config.optim.lr=...) to reproduce a scaled run.
"""
from configs import base_autoencoder, base_ldm, vq_f4


def get_config():
    c = base_ldm.get_config()
    m = c.model
    m.image_size, m.channels = 64, 3
    m.unet_config.params.update(dict(
        image_size=64, in_channels=3, out_channels=3, model_channels=224, attention_resolutions=(8, 4, 2),
        channel_mult=(1, 2, 3, 4), num_head_channels=32))
    m.first_stage_config.update(base_autoencoder.first_stage_config(vq_f4.get_config()))
    c.data.update(dict(size=256, batch_size=48))
    c.optim.lr = 2e-6
    return c
