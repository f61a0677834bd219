"""A tiny class-conditional LDM (KL f4 first stage, cross-attention UNet) for tests and smoke runs."""
from configs import base_ldm


def get_config():
    c = base_ldm.get_config()
    m = c.model
    m.image_size, m.channels = 4, 3
    m.conditioning_key, m.cond_stage_key, m.cond_drop_prob = "crossattn", "class_label", 0.1
    m.unet_config.params.update(dict(
        image_size=4, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=(2,),
        num_res_blocks=1, channel_mult=(1, 2), num_heads=2, num_head_channels=-1,
        use_spatial_transformer=True, context_dim=32))
    m.first_stage_config.params.embed_dim = 3
    m.first_stage_config.params.ddconfig.update(dict(z_channels=3, resolution=16, ch=32, ch_mult=(1, 1, 2),
                                                     num_res_blocks=1))
    m.cond_stage_config.target = "ldm.modules.encoders.modules.ClassEmbedder"
    m.cond_stage_config.params = dict(n_classes=3, embed_dim=32)
    c.data.update(dict(size=16, batch_size=8, num_workers=0))
    c.optim.lr = 1e-3
    c.train.update(dict(steps=4, log_every=1, ckpt_every=2, sample_every=0, sample_steps=5,
                        sample_labels=(0, 1)))
    c.mesh.fsdp_min_size = 1024
    return c
