"""`models/ldm/bsr_sr`: 4x super-resolution (BSR-light degradations of OpenImages), VQ-f4 latents
64x64x3 (113.6M UNet). The low-resolution image (64 px = latent size) is concatenated to the
latents: in_channels 6.

model_channels 160, channel_mult [1,2,2,4], attention at ds 16,8 (only 8 exists: 8 px), 32 channels
per head; linear_end 0.0155; random 256 crops, batch 64, base lr 1e-6.
"""
from configs import base_autoencoder, base_ldm, vq_f4


def get_config():
    c = base_ldm.get_config()
    m = c.model
    m.image_size, m.channels = 64, 3
    m.linear_end = 0.0155
    m.conditioning_key, m.cond_stage_key = "concat", "LR_image"
    m.unet_config.params.update(dict(
        image_size=64, in_channels=6, out_channels=3, model_channels=160, attention_resolutions=(16, 8),
        channel_mult=(1, 2, 2, 4), num_head_channels=32))
    m.first_stage_config.update(base_autoencoder.first_stage_config(vq_f4.get_config()))
    m.cond_stage_config.target = "torch.nn.Identity"
    m.cond_stage_config.trainable = False
    c.data.update(dict(size=256, random_crop=True, batch_size=64))
    c.optim.lr = 1e-6
    return c
