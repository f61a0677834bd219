"""`models/ldm/inpainting_big`: inpainting (Places), VQ-f4-noattn latents 64x64x3 (387.2M UNet). The
first stage's encoding of the masked image (3 ch) and the mask at latent size (1 ch) are
concatenated to the latents: in_channels 7.

model_channels 256, channel_mult [1,2,3,4], attention at ds 8,4,2 with 8 heads, ResBlock
up/downsampling; l1 loss, linear_end 0.0205. lr: base 1e-6 with LambdaWarmUpCosineScheduler (1000
warm-up steps, cosine to step 50000); CompVis' multipliers run 0.001 -> 0.1 -> 1e-4 of the (scaled)
lr, ours 0 -> 1 -> 0 of optim.lr. The YAML has no data section (batch 64 is the base default).
"""
from configs import base_autoencoder, base_ldm, vq_f4_noattn


def get_config():
    c = base_ldm.get_config()
    m = c.model
    m.image_size, m.channels = 64, 3
    m.loss_type, m.linear_end = "l1", 0.0205
    m.conditioning_key, m.cond_stage_key = "concat", "masked_image"
    m.unet_config.params.update(dict(
        image_size=64, in_channels=7, out_channels=3, model_channels=256, attention_resolutions=(8, 4, 2),
        channel_mult=(1, 2, 3, 4), num_heads=8, num_head_channels=-1, resblock_updown=True))
    m.first_stage_config.update(base_autoencoder.first_stage_config(vq_f4_noattn.get_config()))
    m.cond_stage_config.target = "__is_first_stage__"
    m.cond_stage_config.trainable = False
    c.data.size = 256
    c.optim.update(dict(lr=1e-6, warmup_steps=1000, schedule="cosine"))
    c.train.steps = 50_000
    return c
