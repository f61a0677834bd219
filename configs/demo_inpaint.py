"""Inpainting demo on `shapes`: random boxes are masked out; the masked image's latents and the mask are
concatenated with the noisy latents, as the paper's inpainting model. Reuses the demo's first stage."""
from configs import demo


def get_config():
    c = demo.get_config()
    c.name = "demo_inpaint"
    m = c.model
    m.conditioning_key, m.cond_stage_key, m.cond_drop_prob = "concat", "masked_image", 0.0
    m.unet_config.params.update(dict(in_channels=4 + 4 + 1, use_spatial_transformer=False, context_dim=0))
    m.cond_stage_config.target = "__is_first_stage__"
    m.cond_stage_config.vocab = ""
    m.cond_stage_config.params = dict()
    c.data.cache_latents = False  # masks are drawn anew every step
    c.train.steps = 400
    return c
