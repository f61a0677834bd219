"""`configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml` (= models/ldm/lsun_churches256):
unconditional LSUN churches on KL-f8 latents 32x32x4 (295.0M UNet).

model_channels 192, channel_mult [1,2,2,4,4], attention at ds 1,2,4,8 with 8 heads, scale-shift norm
and ResBlock up/downsampling; l1 loss, linear_end 0.0155, scale_factor = 1/std of the first batch's
latents (scale_by_std). lr 5e-5 is meant as the final lr (the YAML says: run with --scale_lr False),
after a 10k-step linear warm-up (LambdaLinearScheduler; it starts at 1e-6 x lr, ours at 0).
"""
from configs import base_autoencoder, base_ldm, kl_f8


def get_config():
    c = base_ldm.get_config()
    m = c.model
    m.image_size, m.channels = 32, 4
    m.loss_type, m.linear_end = "l1", 0.0155
    m.scale_by_std = True  # scale_factor (1.0 here) is replaced at run time
    m.unet_config.params.update(dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=192, attention_resolutions=(1, 2, 4, 8),
        channel_mult=(1, 2, 2, 4, 4), num_heads=8, num_head_channels=-1, use_scale_shift_norm=True,
        resblock_updown=True))
    m.first_stage_config.update(base_autoencoder.first_stage_config(kl_f8.get_config()))
    c.data.update(dict(size=256, batch_size=96))
    c.optim.update(dict(lr=5e-5, warmup_steps=10_000, schedule="constant"))
    return c
