"""VQ-f8 with 256 codes (`models/first_stage_models/vq-f8-n256`); a 3-layer discriminator from step
250001."""
from configs import vq_f8


def get_config():
    c = vq_f8.get_config()
    c.model.n_embed = 256
    c.model.loss.update(dict(disc_start=250001, disc_weight=0.75, disc_num_layers=3))
    return c
