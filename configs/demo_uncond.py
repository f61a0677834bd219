"""Unconditional demo on `shapes` (self-attention UNet, no conditioning). Reuses the demo's first stage."""
from configs import demo


def get_config():
    c = demo.get_config()
    c.name = "demo_uncond"
    m = c.model
    m.conditioning_key, m.cond_stage_key, m.cond_drop_prob = "", "", 0.0
    m.unet_config.params.update(dict(use_spatial_transformer=False, context_dim=0))
    m.cond_stage_config.target = "__is_unconditional__"
    m.cond_stage_config.vocab = ""
    m.cond_stage_config.params = dict()
    c.train.steps = 500
    return c
