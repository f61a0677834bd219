"""`models/ldm/text2img256`: text-to-image on Conceptual Captions, VQ-f4 latents 64x64x3 (403.6M UNet,
plus a BERTEmbedder(n_embed 640, n_layer 32)).

model_channels 192, channel_mult [1,2,3,5], SpatialTransformer (depth 1, context 640) at ds 8,4,2 with
32 channels per head. Batch 28, base lr 2e-6 (CompVis scales it; see ldm_vq4_uncond.py). Needs
--config.model.cond_stage_config.vocab=/path/to/vocab.txt at run time.
"""
from configs import base_autoencoder, base_ldm, vq_f4


def get_config():
    c = base_ldm.get_config()
    m = c.model
    m.image_size, m.channels = 64, 3
    m.conditioning_key, m.cond_stage_key = "crossattn", "caption"
    m.unet_config.params.update(dict(
        image_size=64, in_channels=3, out_channels=3, model_channels=192, attention_resolutions=(8, 4, 2),
        channel_mult=(1, 2, 3, 5), num_head_channels=32, use_spatial_transformer=True, transformer_depth=1,
        context_dim=640))
    m.first_stage_config.update(base_autoencoder.first_stage_config(vq_f4.get_config()))
    m.cond_stage_config.target = "ldm.modules.encoders.modules.BERTEmbedder"
    m.cond_stage_config.trainable = True
    m.cond_stage_config.params = dict(n_embed=640, n_layer=32)
    c.data.update(dict(size=256, batch_size=28))
    c.optim.lr = 2e-6
    c.train.sample_prompts = ("a painting of a squirrel eating a burger",)
    return c
