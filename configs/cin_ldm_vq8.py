"""`configs/latent-diffusion/cin-ldm-vq-f8.yaml` (= models/ldm/cin256): class-conditional ImageNet
256 on VQ-f8 latents 32x32x4 (395.0M UNet).

model_channels 256, channel_mult [1,2,4], SpatialTransformer (depth 1, context 512) at ds 4,2,1 with 32
channels per head; a trainable ClassEmbedder(1000, 512) through cross-attention. Batch 64, base lr 1e-6
(CompVis scales it by n_gpu x batch; see ldm_vq4_uncond.py).
"""
from configs import base_autoencoder, base_ldm, vq_f8


def get_config():
    c = base_ldm.get_config()
    m = c.model
    m.image_size, m.channels = 32, 4
    m.conditioning_key, m.cond_stage_key = "crossattn", "class_label"
    m.unet_config.params.update(dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=256, attention_resolutions=(4, 2, 1),
        channel_mult=(1, 2, 4), num_head_channels=32, use_spatial_transformer=True, transformer_depth=1,
        context_dim=512))
    m.first_stage_config.update(base_autoencoder.first_stage_config(vq_f8.get_config()))
    m.cond_stage_config.target = "ldm.modules.encoders.modules.ClassEmbedder"
    m.cond_stage_config.trainable = True
    m.cond_stage_config.params = dict(n_classes=1000, embed_dim=512)
    c.data.update(dict(size=256, batch_size=64))
    c.optim.lr = 1e-6
    c.train.sample_labels = (25, 187, 448, 992)  # the ImageNet notebook's classes
    return c
