"""`configs/latent-diffusion/txt2img-1p4B-eval.yaml` ("text2img-large", LAION-400M): text-to-image
256 on KL-f8 latents 32x32x4 (872.3M UNet + 542.9M LDMBert text encoder; CompVis counts 582.0M
with its unused to_logits head, 1.45B in all).

model_channels 320, channel_mult [1,2,4,4], SpatialTransformer (depth 1, context 1280) at ds 4,2,1 with
8 heads (legacy False), activation checkpointing (use_checkpoint -> remat; ours also checkpoints the text encoder's layers); a trainable
BERTEmbedder(n_embed 1280, n_layer 32). Linear schedule 0.00085 / 0.012, scale_factor 0.18215, no EMA,
base lr 5e-5. The YAML has no data section: batch 64 is the base default.

Needs at run time: --config.model.cond_stage_config.vocab=/path/to/vocab.txt (bert-base-uncased's
WordPiece vocabulary) and a caption dataset (data.captions).
"""
from configs import base_autoencoder, base_ldm, kl_f8


def get_config():
    c = base_ldm.get_config()
    m = c.model
    m.image_size, m.channels = 32, 4
    m.linear_start, m.linear_end = 0.00085, 0.012
    m.scale_factor = 0.18215
    m.conditioning_key, m.cond_stage_key = "crossattn", "caption"
    # Classifier-free guidance (sampled at scale 5 by scripts/txt2img.py) needs training with empty
    # captions: the paper's code has no caption dropout; 0.1 is our value.
    m.cond_drop_prob = 0.1
    m.unet_config.params.update(dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=(4, 2, 1),
        channel_mult=(1, 2, 4, 4), num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
        transformer_depth=1, context_dim=1280, use_checkpoint=True, legacy=False))
    m.first_stage_config.update(base_autoencoder.first_stage_config(kl_f8.get_config()))
    m.cond_stage_config.target = "ldm.modules.encoders.modules.BERTEmbedder"
    m.cond_stage_config.trainable = True
    m.cond_stage_config.params = dict(n_embed=1280, n_layer=32, use_checkpoint=True)
    c.data.size = 256
    c.optim.lr = 5e-5
    c.train.update(dict(ema=False, guidance_scale=5.0, sample_prompts=(
        "a painting of a virus monster playing guitar", "a painting of a squirrel eating a burger")))
    return c
