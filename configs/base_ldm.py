"""Base config of the LDM stage: every key, with the paper's defaults (CompVis `LatentDiffusion`).

`model` mirrors the YAML's `model.params` (unet_config / first_stage_config / cond_stage_config), so
released configs are transcriptions and `latentdiff.convert.loaders.build_ldm` builds them.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.stage = "ldm"
    c.name = ""  # train.py's default workdir is workdir/<name>
    c.seed = 23
    c.model = ml_collections.ConfigDict(dict(
        timesteps=1000, beta_schedule="linear", linear_start=0.0015, linear_end=0.0195,
        parameterization="eps", loss_type="l2",
        image_size=32, channels=4,  # latent resolution and channels
        conditioning_key="",  # '' (unconditional), 'crossattn' or 'concat'
        cond_stage_key="",  # batch key the conditioning comes from: caption, class_label, ...
        scale_factor=1.0, scale_by_std=False,  # scale_by_std: 1/std of the first global batch
        cond_drop_prob=0.0,  # classifier-free guidance dropout (text -> "", class -> null class)
        unet_config=dict(params=dict(
            image_size=32, in_channels=4, out_channels=4, model_channels=128, attention_resolutions=(4, 2),
            num_res_blocks=2, channel_mult=(1, 2, 4), num_heads=-1, num_head_channels=32,
            use_scale_shift_norm=False, resblock_updown=False, use_spatial_transformer=False,
            transformer_depth=1, context_dim=0, use_checkpoint=False, legacy=True)),
        first_stage_config=dict(
            target="ldm.models.autoencoder.AutoencoderKL",  # or ...VQModelInterface
            checkpoint="",  # our autoencoder run dir, or a CompVis/diffusers checkpoint
            params=dict(embed_dim=4, n_embed=0, ddconfig=dict(
                double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(), dropout=0.0,
                attn_type="vanilla"))),  # attn_type 'none': no mid-block attention (vq-f4-noattn)
        cond_stage_config=dict(target="__is_unconditional__", trainable=True, vocab="",
                               params=dict()),
    ))
    c.data = ml_collections.ConfigDict(dict(
        # 'folder' (root, captions, labels_from_dirs), 'array_record' (path), 'tfds' (name, split,
        # data_dir), or 'shapes': the built-in procedural dataset (num_examples, split)
        source="folder",
        root="", captions="", labels_from_dirs=True, path="", name="", split="train", data_dir="",
        num_examples=10_000,
        size=256, random_crop=False, random_flip=True, batch_size=64, num_workers=4,
        cache_latents=False))  # LDM stage: encode the data once, train from cached first-stage moments
    c.optim = ml_collections.ConfigDict(dict(
        lr=2e-6, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0, schedule="constant",
        grad_clip=0.0, accumulate=1))
    c.train = ml_collections.ConfigDict(dict(
        steps=100_000, dtype="float32", ema=True, ema_max_decay=0.9999, log_every=50, ckpt_every=1000,
        max_to_keep=3, sample_every=5000, num_sample=8, sample_steps=50, guidance_scale=1.0,
        sample_prompts=("",), sample_labels=(0,)))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2 ** 16))
    # several processes (hosts): latentdiff.runtime.initialize_distributed; "auto" also joins a
    # detected SLURM / Open MPI / multi-host TPU job
    c.distributed = ml_collections.ConfigDict(dict(mode="auto", coordinator_address="", num_processes=0,
                                                   process_id=-1))
    # The end-of-run report on the built-in `shapes` data (latentdiff.training.report): samples at
    # these guidance scales (none: no report), samples_per_condition each, `steps` of `sampler`.
    c.evaluate = ml_collections.ConfigDict(dict(guidance_scales=(), samples_per_condition=8, steps=25,
                                                sampler="ddim"))
    return c
