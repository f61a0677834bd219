"""VQ-f4 without attention (`models/first_stage_models/vq-f4-noattn`, `attn_type: none`): the first
stage of inpainting_big."""
from configs import vq_f4


def get_config():
    c = vq_f4.get_config()
    c.model.ddconfig.attn_type = "none"
    c.model.loss.disc_start = 11
    return c
