"""x4 super-resolution demo on `shapes`: 8x8 low-resolution images (antialiased bicubic) concatenated
with the 8x8x4 latents of the 32x32 images, as the paper's LDM-SR. Reuses the demo's first stage."""
from configs import demo


def get_config():
    c = demo.get_config()
    c.name = "demo_superres"
    m = c.model
    m.conditioning_key, m.cond_stage_key, m.cond_drop_prob = "concat", "image", 0.0
    m.unet_config.params.update(dict(in_channels=4 + 3, use_spatial_transformer=False, context_dim=0))
    m.cond_stage_config.target = "torch.nn.Identity"
    m.cond_stage_config.vocab = ""
    m.cond_stage_config.params = dict()
    c.data.cache_latents = False  # the low-resolution input is made from the image every step
    c.train.steps = 400
    return c
