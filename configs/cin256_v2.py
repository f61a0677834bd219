"""`configs/latent-diffusion/cin256-v2.yaml`: the ImageNet notebook's class-conditional LDM-4 with
classifier-free guidance (400.9M UNet), on VQ-f4 latents 64x64x3.

model_channels 192, channel_mult [1,2,3,5], SpatialTransformer (depth 1, context 512) at ds 8,4,2 with
ONE head (head dim = all channels); ClassEmbedder(1001, 512), class 1000 being the null label used
for guidance. No EMA (use_ema: False). Base lr 1e-4. The YAML has no data section: batch 64 is the
base default, not the paper's.
"""
from configs import base_autoencoder, base_ldm, vq_f4


def get_config():
    c = base_ldm.get_config()
    m = c.model
    m.image_size, m.channels = 64, 3
    m.conditioning_key, m.cond_stage_key = "crossattn", "class_label"
    # Classifier-free guidance needs training with the null class: the paper's code has no label
    # dropout (cond_drop_prob); 0.1 is our value.
    m.cond_drop_prob = 0.1
    m.unet_config.params.update(dict(
        image_size=64, in_channels=3, out_channels=3, model_channels=192, attention_resolutions=(8, 4, 2),
        channel_mult=(1, 2, 3, 5), num_heads=1, num_head_channels=-1, use_spatial_transformer=True,
        transformer_depth=1, context_dim=512))
    m.first_stage_config.update(base_autoencoder.first_stage_config(vq_f4.get_config()))
    m.cond_stage_config.target = "ldm.modules.encoders.modules.ClassEmbedder"
    m.cond_stage_config.trainable = True
    m.cond_stage_config.params = dict(n_classes=1001, embed_dim=512)
    c.data.size = 256
    c.optim.lr = 1e-4
    c.train.update(dict(ema=False, sample_labels=(25, 187, 448, 992), guidance_scale=3.0))  # notebook
    return c
