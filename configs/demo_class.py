"""Class-conditional demo on `shapes`: the 12 (colour, shape) classes, a 13th label as the null class
for classifier-free guidance (10% label dropout). Reuses the demo's first stage."""
from configs import demo


def get_config():
    c = demo.get_config()
    c.name = "demo_class"
    m = c.model
    m.cond_stage_key = "class_label"
    m.cond_stage_config.target = "ldm.modules.encoders.modules.ClassEmbedder"
    m.cond_stage_config.vocab = ""
    m.cond_stage_config.params = dict(n_classes=13, embed_dim=64)
    c.train.steps = 500
    return c
