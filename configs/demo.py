"""The built-in default (`python train.py`): a small text-to-image LDM on the `shapes` dataset.

Trains `shapes_autoencoder` first when `workdir/shapes_autoencoder` has none, then a cross-attention
UNet on its 8x8x4 latents with a small LDMBert trained alongside (the paper's text setup, shrunk),
10% caption dropout for classifier-free guidance, and latents cached once. At the end it samples
the held-out prompts (colour/shape/position combinations never seen in training) at several
guidance scales, prints how often the images match them, and writes a grid and a loss plot.
"""
import os

from configs import base_autoencoder, base_ldm, shapes_autoencoder
from latentdiff.data import shapes

VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_vocab.txt")


def get_config():
    c = base_ldm.get_config()
    c.name = "demo"
    ae = shapes_autoencoder.get_config()
    c.autoencoder = ae  # trained into first_stage_config.checkpoint when that has no autoencoder yet
    m = c.model
    m.image_size, m.channels = 8, 4
    m.scale_by_std = True
    m.conditioning_key, m.cond_stage_key, m.cond_drop_prob = "crossattn", "caption", 0.1
    m.unet_config.params.update(dict(
        image_size=8, in_channels=4, out_channels=4, model_channels=64, attention_resolutions=(1, 2),
        num_res_blocks=1, channel_mult=(1, 2), num_heads=-1, num_head_channels=32,
        use_spatial_transformer=True, transformer_depth=1, context_dim=64, legacy=False))
    m.first_stage_config.update(base_autoencoder.first_stage_config(ae, checkpoint="workdir/shapes_autoencoder"))
    m.cond_stage_config.target = "ldm.modules.encoders.modules.BERTEmbedder"
    m.cond_stage_config.vocab = VOCAB
    m.cond_stage_config.params = dict(n_embed=64, n_layer=2, heads=2, dim_head=32, max_seq_len=16,
                                      vocab_size=len(shapes.vocabulary()))
    c.data.update(dict(source="shapes", size=32, num_examples=4096, random_crop=False, random_flip=False,
                       batch_size=32, num_workers=0, cache_latents=True))
    c.optim.update(dict(lr=1e-3, warmup_steps=100))
    heldout = tuple(shapes.caption(*combo) for combo in shapes.HELDOUT)
    c.train.update(dict(steps=800, ema_max_decay=0.999, log_every=20, ckpt_every=500, sample_every=0,
                        sample_steps=25, guidance_scale=3.0, sample_prompts=heldout))
    c.mesh.fsdp_min_size = 2 ** 20
    c.evaluate.guidance_scales = (1.0, 2.0, 3.0, 4.0, 6.0)  # the end-of-run report on held-out prompts
    return c
