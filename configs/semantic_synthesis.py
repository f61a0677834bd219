"""`models/ldm/semantic_synthesis256`: landscapes from 182-class segmentation maps, VQ-f4 latents
64x64x3 (215.2M UNet, in_channels 6).

model_channels 128, channel_mult [1,4,8], attention_resolutions 32,16,8 (none occurs at ds <= 4, so
attention only in the middle block), 8 heads; the map is concatenated after a trainable
SpatialRescaler(n_stages 2, 182 -> 3). l1 loss, linear_end 0.0205, base lr 1e-6. The YAML has no data
section (batch 64 is the base default).

`semantic_synthesis512` is the same network: --config.model.image_size=128
--config.model.unet_config.params.image_size=128 --config.data.size=512 --config.data.batch_size=8.
"""
from configs import base_autoencoder, base_ldm, vq_f4


def get_config():
    c = base_ldm.get_config()
    m = c.model
    m.image_size, m.channels = 64, 3
    m.loss_type, m.linear_end = "l1", 0.0205
    m.conditioning_key, m.cond_stage_key = "concat", "segmentation"
    m.unet_config.params.update(dict(
        image_size=64, in_channels=6, out_channels=3, model_channels=128, attention_resolutions=(32, 16, 8),
        channel_mult=(1, 4, 8), num_heads=8, num_head_channels=-1))
    m.first_stage_config.update(base_autoencoder.first_stage_config(vq_f4.get_config()))
    m.cond_stage_config.target = "ldm.modules.encoders.modules.SpatialRescaler"
    m.cond_stage_config.trainable = True
    m.cond_stage_config.params = dict(n_stages=2, in_channels=182, out_channels=3)
    c.data.size = 256
    c.optim.lr = 1e-6
    return c
