"""Base config of the autoencoder stage: every key, with the paper's defaults (KL-f8 shape).

`model` mirrors a CompVis first-stage YAML: `ddconfig` is the Encoder/Decoder's (`embed_dim`, and
`n_embed` for VQ), `loss` the `lossconfig.params` of `LPIPSWithDiscriminator` (KL) or taming's
`VQLPIPSWithDiscriminator` (VQ). The released models are small diffs of this (kl_f4.py ... vq_f16.py),
and LDM configs take their first stage from them with `first_stage_config(...)`.
"""
import ml_collections

from configs import base_ldm


def get_config():
    c = ml_collections.ConfigDict()
    c.stage = "autoencoder"
    c.name = ""  # train.py's default workdir is workdir/<name>
    c.seed = 23
    c.model = ml_collections.ConfigDict(dict(
        target="kl",  # 'kl' (AutoencoderKL) or 'vq' (VQModel)
        embed_dim=4,
        n_embed=0,  # codebook size (VQ only; 0 for KL)
        ddconfig=dict(
            double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
            ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(), dropout=0.0,
            attn_type="vanilla"),  # attn_resolutions in pixels; attn_type 'none': no mid attention
        loss=dict(
            disc_start=50001,  # generator step at which the GAN terms switch on
            kl_weight=1e-6,  # KL only
            disc_weight=0.5,  # adaptive-weight multiplier (KL 0.5; VQ 0.75, vq-f8 0.6)
            perceptual_weight=1.0,
            codebook_weight=1.0,  # VQ only
            disc_num_layers=3,  # PatchGAN depth
            disc_loss="hinge",  # 'hinge' or 'vanilla'
            # The converted LPIPS weights (latentdiff.convert.lpips_weights); required at run time
            # unless perceptual_weight == 0.
            lpips_weights=""),
    ))
    # Released first stages: OpenImages, shorter side resized to 384 then a random 256 crop. Our
    # Preprocess takes a random square and resizes it to `size`, the closest match.
    c.data = base_ldm.get_config().data
    c.data.update(dict(size=256, random_crop=True, batch_size=4))
    # base lr as in the YAMLs; CompVis main.py multiplies it by accumulate x n_gpu x batch_size
    # (--scale_lr True, the default), our loop uses optim.lr as it is. Adam for AE and
    # discriminator, betas (0.5, 0.9).
    c.optim = ml_collections.ConfigDict(dict(lr=4.5e-6, b1=0.5, b2=0.9, accumulate=1))
    c.train = ml_collections.ConfigDict(dict(
        steps=500_000, dtype="float32", log_every=50, ckpt_every=5000, max_to_keep=3,
        sample_every=5000))
    c.mesh = base_ldm.get_config().mesh
    c.distributed = base_ldm.get_config().distributed
    return c


def first_stage_config(ae_config, checkpoint=""):
    """An autoencoder config -> an LDM's `model.first_stage_config` (the CompVis layout)."""
    m = ae_config.model
    target = "VQModelInterface" if m.target == "vq" else "AutoencoderKL"
    return dict(target=f"ldm.models.autoencoder.{target}", checkpoint=checkpoint,
                params=dict(embed_dim=m.embed_dim, n_embed=m.n_embed, ddconfig=m.ddconfig.to_dict()))
