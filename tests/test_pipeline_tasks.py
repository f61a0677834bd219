"""End to end: the pipeline's unconditional, super-resolution, inpainting and semantic-synthesis tasks,
our own checkpoint format, and the errors that bad input gets.

References: diffusers' LDMPipeline / LDMSuperResolutionPipeline for diffusers folders; for CompVis
`.ckpt` + YAML (tiny versions of models/ldm/bsr_sr, inpainting_big, semantic_synthesis256) a PyTorch
loop written here: diffusers modules, DDIMScheduler with the paper's +1 offset, and the conditioning
built as the paper's scripts build it.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from latentdiff import LatentDiffusionPipeline
from tests.ldm_fixtures import (compvis_autoencoder_names, compvis_unet_names, ldm_text2img_folder,
                                perturb_, psnr)

torch = pytest.importorskip("torch")
STEPS = 5
PROMPTS = ["a painting of a squirrel eating a burger", "a red circle at the top left"]


# ---------------------------------------------------------------------------- tiny models
def _vq(seed, attention=True):
    """VQ-f4 (3 levels, z = embed = 3) as in the paper's vq-f4, with 64 codes."""
    from diffusers import VQModel

    return perturb_(VQModel(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=3, num_vq_embeddings=64, vq_embed_dim=3, norm_num_groups=32, sample_size=32,
        mid_block_add_attention=attention), seed=seed).eval()


def _unet2d(seed, in_channels, **kw):
    """openaimodel UNetModel(model_channels 32, channel_mult [1, 2], num_res_blocks 1) as UNet2DModel."""
    from diffusers import UNet2DModel

    kw.setdefault("down_block_types", ("DownBlock2D", "AttnDownBlock2D"))
    kw.setdefault("up_block_types", ("AttnUpBlock2D", "UpBlock2D"))
    return perturb_(UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=3,
                                block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                                **kw), seed=seed).eval()


def _nhwc_latents(seed, shape):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape))


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


def _uint8(images_nchw):
    """[-1, 1] NCHW torch images -> uint8 NHWC, as our pipeline rounds them."""
    img = ((images_nchw / 2 + 0.5).clamp(0, 1)).numpy().transpose(0, 2, 3, 1)
    return np.round(img * 255).astype(np.uint8)


# ---------------------------------------------------------------------------- 1. LDMPipeline
@pytest.fixture(scope="module")
def uncond(tmp_path_factory):
    from diffusers import DDIMScheduler, LDMPipeline

    path = str(tmp_path_factory.mktemp("ldm_uncond"))
    torch.manual_seed(0)
    unet = _unet2d(1, 3, attention_head_dim=32)
    # what diffusers' scripts/conversion_ldm_uncond.py writes: steps_offset 0, set_alpha_to_one True
    sched = DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                          clip_sample=False)
    ref = LDMPipeline(vqvae=_vq(2), unet=unet, scheduler=sched)
    ref.save_pretrained(path)
    return path, ref, LatentDiffusionPipeline.from_pretrained(path)


def test_unconditional_matches_diffusers(uncond):
    _, ref_pipe, pipe = uncond
    assert pipe.config.task == "uncond" and pipe.config.latent_channels == 3
    # diffusers' LDMPipeline divides by vqvae.config.scaling_factor, which save_pretrained writes
    assert pipe.config.scale_factor == pytest.approx(ref_pipe.vqvae.config.scaling_factor)
    latents = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    out = ref_pipe(batch_size=2, generator=torch.Generator().manual_seed(0),
                   num_inference_steps=STEPS, eta=0.0, output_type="np").images
    ref = np.round(out * 255).astype(np.uint8)
    img = pipe(num_samples=2, latents=latents.numpy().transpose(0, 2, 3, 1),
               num_inference_steps=STEPS)
    assert img.dtype == np.uint8 and img.shape == (2, 32, 32, 3) and img.std() > 5
    value = psnr(img, ref)
    print(f"uncond (diffusers LDMPipeline) PSNR {value:.1f} dB")
    assert value >= 40.0


def test_unconditional_folder_without_scaling_factor_decodes_unscaled(uncond, tmp_path):
    """Released LDMPipeline folders (ldm-celebahq-256) predate `scaling_factor`: the paper's 1.0."""
    path = str(tmp_path / "old")
    shutil.copytree(uncond[0], path)
    cfg_path = os.path.join(path, "vqvae", "config.json")
    cfg = json.load(open(cfg_path))
    del cfg["scaling_factor"]
    json.dump(cfg, open(cfg_path, "w"))
    assert LatentDiffusionPipeline.from_pretrained(path).config.scale_factor == 1.0


# ---------------------------------------------------------------------------- 2. LDMSuperResolution
@pytest.fixture(scope="module")
def superres_folder(tmp_path_factory):
    from diffusers import DDIMScheduler, LDMSuperResolutionPipeline

    path = str(tmp_path_factory.mktemp("ldm_superres"))
    torch.manual_seed(0)
    sched = DDIMScheduler(beta_start=0.0015, beta_end=0.0155, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref = LDMSuperResolutionPipeline(vqvae=_vq(4), unet=_unet2d(3, 6, attention_head_dim=32),
                                     scheduler=sched)
    ref.save_pretrained(path)
    return path, ref


def test_superres_matches_diffusers(superres_folder):
    path, ref_pipe = superres_folder
    low = np.random.RandomState(0).randint(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    low_pm1 = low.astype(np.float32) / 127.5 - 1.0
    out = ref_pipe(image=_nchw(low_pm1), num_inference_steps=STEPS, eta=0.0,
                   generator=torch.Generator().manual_seed(0), output_type="np").images
    ref = np.round(out * 255).astype(np.uint8)
    latents = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    pipe = LatentDiffusionPipeline.from_pretrained(path)
    assert pipe.config.task == "superres" and pipe.config.latent_channels == 3
    kw = dict(latents=latents.numpy().transpose(0, 2, 3, 1), num_inference_steps=STEPS)
    img = pipe(image=low, **kw)
    assert img.shape == (2, 32, 32, 3) and img.std() > 5  # 4x the input
    value = psnr(img, ref)
    print(f"superres (diffusers LDMSuperResolutionPipeline) PSNR {value:.1f} dB")
    assert value >= 40.0
    np.testing.assert_array_equal(pipe(image=low_pm1, **kw), img)  # float [-1, 1] input


# ---------------------------------------------------------------------------- 3. CompVis tasks
_DDCONFIG = dict(double_z=False, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=32,
                 ch_mult=[1, 1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
# tiny versions of the released configs: (unet_config params, model params, cond_stage_config)
_TASKS = {
    "bsr_sr": (dict(in_channels=6, attention_resolutions=[2, 4], num_head_channels=32),
               dict(linear_end=0.0155, cond_stage_key="LR_image", cond_stage_trainable=False),
               {"target": "torch.nn.Identity"}),
    "inpainting_big": (dict(in_channels=7, attention_resolutions=[2], num_heads=8,
                            resblock_updown=True),
                       dict(linear_end=0.0205, cond_stage_key="masked_image"),
                       "__is_first_stage__"),
    "semantic_synthesis256": (dict(in_channels=6, attention_resolutions=[4, 8], num_heads=8),
                              dict(linear_end=0.0205, cond_stage_key="segmentation",
                                   cond_stage_trainable=True),
                              {"target": "ldm.modules.encoders.modules.SpatialRescaler",
                               "params": {"n_stages": 2, "in_channels": 182, "out_channels": 3}}),
}


def _write_compvis(tmp, name):
    """A CompVis `.ckpt` + YAML for `name`, and the diffusers modules holding the same weights."""
    unet_p, model_p, cond_cfg = _TASKS[name]
    torch.manual_seed(0)
    if name == "bsr_sr":  # attention at ds 2 (64 ch), 32 channels per head
        unet, levels, heads = _unet2d(11, 6, attention_head_dim=32), [False, True], lambda c: c // 32
    elif name == "inpainting_big":  # attention at ds 2, 8 heads, ResBlock down/upsampling
        unet = _unet2d(12, 7, attention_head_dim=8, down_block_types=("ResnetDownsampleBlock2D",
                                                                     "AttnDownBlock2D"),
                       downsample_type="resnet", upsample_type="resnet")
        levels, heads = [False, True], lambda c: 8
    else:  # no listed ds occurs: attention only in the middle block, 8 heads
        unet = _unet2d(13, 6, attention_head_dim=8, down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2)
        levels, heads = [False, False], lambda c: 8
    vq = _vq(14, attention=name != "inpainting_big")  # inpainting_big: attn_type none
    sd = {}
    for k, v in compvis_unet_names({k: v.numpy() for k, v in unet.state_dict().items()}, 1, levels,
                                   heads).items():
        sd["model.diffusion_model." + k] = torch.from_numpy(np.ascontiguousarray(v))
    vq_sd = compvis_autoencoder_names({k: v.numpy() for k, v in vq.state_dict().items()}, 3)
    for k, v in vq_sd.items():
        sd["first_stage_model." + k] = torch.from_numpy(np.ascontiguousarray(v))
        if name == "inpainting_big":  # cond_stage_model IS first_stage_model: saved twice
            sd["cond_stage_model." + k] = sd["first_stage_model." + k]
    mapper = None
    if name == "semantic_synthesis256":
        mapper = perturb_(torch.nn.Conv2d(182, 3, 1, bias=False), seed=15)
        sd["cond_stage_model.channel_mapper.weight"] = mapper.weight.detach().clone()
    ckpt = str(tmp / f"{name}.ckpt")
    torch.save({"state_dict": sd, "global_step": 1}, ckpt)
    ddconfig = dict(_DDCONFIG, **({"attn_type": "none"} if name == "inpainting_big" else {}))
    cfg = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "timesteps": 1000, "first_stage_key": "image", "image_size": 8,
        "channels": 3, "concat_mode": True, **model_p,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                        "params": {"image_size": 8, "out_channels": 3, "model_channels": 32,
                                   "num_res_blocks": 1, "channel_mult": [1, 2], **unet_p}},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
            "embed_dim": 3, "n_embed": 64, "ddconfig": ddconfig,
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": cond_cfg}}}
    path = str(tmp / f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return ckpt, path, (unet, vq, mapper, model_p["linear_end"])


def _reference(models, latents_nhwc, concat):
    """The paper's DDIM (eta 0, +1 offset) with `concat` (NCHW) as c_concat, then the VQ decode."""
    from diffusers import DDIMScheduler

    unet, vq, _, linear_end = models
    sched = DDIMScheduler(beta_start=0.0015, beta_end=linear_end, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(STEPS)
    x = _nchw(latents_nhwc)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(torch.cat([x, concat], 1), t).sample, t, x).prev_sample
        return vq.decode(x).sample  # quantises, as decode_first_stage does for VQModelInterface


@pytest.fixture(scope="module")
def compvis_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("compvis_tasks")


@pytest.fixture(scope="module")
def inpaint_pipe(compvis_tmp):
    ckpt, cfg, models = _write_compvis(compvis_tmp, "inpainting_big")
    return LatentDiffusionPipeline.from_pretrained(ckpt, config=cfg), models


def test_compvis_superres_matches_reference(compvis_tmp):
    ckpt, cfg, models = _write_compvis(compvis_tmp, "bsr_sr")
    pipe = LatentDiffusionPipeline.from_pretrained(ckpt, config=cfg)
    assert pipe.config.task == "superres" and pipe.config.scale_factor == 1.0
    low = np.random.RandomState(1).randint(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    latents = _nhwc_latents(1, (2, 8, 8, 3))
    img = pipe(image=low, latents=latents, num_inference_steps=STEPS)
    # notebook_helpers: LR_image in [-1, 1], concatenated at latent resolution
    ref = _uint8(_reference(models, latents, _nchw(low.astype(np.float32) / 127.5 - 1.0)))
    assert img.shape == (2, 32, 32, 3) and img.std() > 5
    value = psnr(img, ref)
    print(f"CompVis bsr_sr PSNR {value:.1f} dB")
    assert value >= 40.0


def _inpaint_inputs():
    rng = np.random.RandomState(2)
    image = rng.randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    mask = np.zeros((2, 32, 32), np.float32)
    mask[0, 6:23, 3:19] = 1.0  # edges off the 4-pixel latent grid: the mask's resize matters
    mask[1, 1:14, 17:30] = 1.0
    return image, mask


def test_compvis_inpainting_matches_reference(inpaint_pipe):
    pipe, models = inpaint_pipe
    assert pipe.config.task == "inpaint" and pipe.vae.config.attn_type == "none"
    image, mask = _inpaint_inputs()
    latents = _nhwc_latents(2, (2, 8, 8, 3))
    img = pipe(image=image, mask=mask, latents=latents, num_inference_steps=STEPS)
    # scripts/inpaint.py make_batch: masked_image = (1 - mask) * image in [0, 1], then every
    # entry (image, mask, masked_image) mapped to [-1, 1]
    image01, m = _nchw(image.astype(np.float32) / 255.0), _nchw(mask[..., None])
    batch = {k: v * 2.0 - 1.0 for k, v in
             dict(image=image01, mask=m, masked_image=(1 - m) * image01).items()}
    _, vq, _, _ = models
    with torch.no_grad():
        c = vq.encode(batch["masked_image"]).latents  # pre-quantisation, as VQModelInterface.encode
    cc = torch.nn.functional.interpolate(batch["mask"], size=c.shape[-2:])
    pred = _reference(models, latents, torch.cat([c, cc], 1))
    predicted = ((pred + 1.0) / 2.0).clamp(0, 1)
    inpainted = (1 - m) * image01 + m * predicted
    ref = np.round(inpainted.numpy().transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    value = psnr(img, ref)
    print(f"CompVis inpainting_big PSNR {value:.1f} dB")
    assert value >= 40.0
    keep = mask == 0
    np.testing.assert_array_equal(img[keep], image[keep])  # the composite keeps the input exactly
    assert np.abs(img[~keep].astype(int) - image[~keep]).mean() > 10  # the hole is filled in


@pytest.fixture(scope="module")
def semantic_pipe(compvis_tmp):
    ckpt, cfg, models = _write_compvis(compvis_tmp, "semantic_synthesis256")
    return LatentDiffusionPipeline.from_pretrained(ckpt, config=cfg), models


def _segmentation():
    labels = np.random.RandomState(3).randint(0, 182, (2, 8, 8)).repeat(4, 1).repeat(4, 2)
    return np.eye(182, dtype=np.float32)[labels]  # one-hot NHWC (2, 32, 32, 182)


def test_compvis_semantic_synthesis_matches_reference(semantic_pipe):
    pipe, models = semantic_pipe
    assert pipe.config.task == "semantic"
    seg = _segmentation()
    latents = _nhwc_latents(3, (2, 8, 8, 3))
    img = pipe(image=seg, latents=latents, num_inference_steps=STEPS)
    _, _, mapper, _ = models
    x = _nchw(seg)
    with torch.no_grad():  # SpatialRescaler(n_stages=2, bilinear, multiplier 0.5, 182 -> 3)
        for _ in range(2):
            x = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear")
        c = mapper(x)
    ref = _uint8(_reference(models, latents, c))
    assert img.shape == (2, 32, 32, 3) and img.std() > 5
    value = psnr(img, ref)
    print(f"CompVis semantic_synthesis256 PSNR {value:.1f} dB")
    assert value >= 40.0


# ---------------------------------------------------------------------------- 4. own format
def _same_pipelines(a, b):
    assert a.config == b.config
    assert type(a.cond_model) is type(b.cond_model)
    np.testing.assert_allclose(a.schedule.betas, b.schedule.betas, rtol=0, atol=0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)


def test_own_format_round_trip_text2img(tmp_path):
    folder = str(tmp_path / "diffusers")
    ldm_text2img_folder(folder)
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.save_pretrained(str(tmp_path / "own"))
    back = LatentDiffusionPipeline.from_pretrained(str(tmp_path / "own"))
    _same_pipelines(pipe, back)
    kw = dict(latents=_nhwc_latents(4, (2, 4, 4, 4)), num_inference_steps=STEPS, guidance_scale=6.0)
    np.testing.assert_array_equal(back(PROMPTS, **kw), pipe(PROMPTS, **kw))


def test_own_format_round_trip_semantic(semantic_pipe, tmp_path):
    """A SpatialRescaler conditioning model (and a CompVis source) survives the round trip."""
    pipe, _ = semantic_pipe
    pipe.save_pretrained(str(tmp_path / "own"))
    back = LatentDiffusionPipeline.from_pretrained(str(tmp_path / "own"))
    _same_pipelines(pipe, back)
    assert back.cond_model.n_stages == 2 and back.cond_model.out_channels == 3
    kw = dict(image=_segmentation(), latents=_nhwc_latents(3, (2, 8, 8, 3)),
              num_inference_steps=STEPS)
    np.testing.assert_array_equal(back(**kw), pipe(**kw))


@pytest.fixture(scope="module")
def class_pipe():
    """A class-conditional pipeline built in JAX (cin256-v2 style: 1001 classes, null class 1000)."""
    from latentdiff.convert.loaders import abstract_params, unet_example
    from latentdiff.diffusion.schedules import NoiseSchedule
    from latentdiff.models.autoencoder import AutoencoderConfig, make_autoencoder
    from latentdiff.models.conditioning import ClassEmbedder
    from latentdiff.models.unet import UNet, UNetConfig
    from latentdiff.pipeline import PipelineConfig

    unet = UNet(UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
                           num_res_blocks=1, attention_resolutions=(2,), num_heads=1,
                           use_spatial_transformer=True, context_dim=32))
    vae = make_autoencoder(AutoencoderConfig(kind="vq", ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                                             resolution=16, z_channels=3, embed_dim=3, n_embed=64))
    cond = ClassEmbedder(n_classes=1001, embed_dim=32)
    shapes = {"unet": abstract_params(unet, *unet_example(unet, 4)),
              "vae": abstract_params(vae, jnp.zeros((1, 16, 16, 3))),
              "cond": abstract_params(cond, jnp.zeros((1,), jnp.int32))}
    rng = np.random.RandomState(0)  # random numbers everywhere (no zero-initialised layer); norms ~1

    def draw(path, leaf):
        x = 0.05 * rng.randn(*leaf.shape).astype(np.float32)
        return jnp.asarray(x + (jax.tree_util.keystr(path).endswith("['scale']")))

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    config = PipelineConfig(task="class2img", latent_channels=3, latent_size=4, vae_scale=4,
                            null_class=1000)
    return LatentDiffusionPipeline(unet=unet, vae=vae, cond_model=cond, params=params, config=config,
                                   schedule=NoiseSchedule.from_config("linear", 1000, 0.0015, 0.0195))


def test_own_format_round_trip_class_conditional(class_pipe, tmp_path):
    class_pipe.save_pretrained(str(tmp_path / "own"))
    back = LatentDiffusionPipeline.from_pretrained(str(tmp_path / "own"))
    _same_pipelines(class_pipe, back)
    assert back.config.null_class == 1000 and back.cond_model.n_classes == 1001
    kw = dict(class_labels=[3, 999], latents=_nhwc_latents(5, (2, 4, 4, 3)),
              num_inference_steps=STEPS, guidance_scale=3.0)
    img = class_pipe(**kw)
    assert img.shape == (2, 16, 16, 3) and img.std() > 5
    np.testing.assert_array_equal(back(**kw), img)


# ---------------------------------------------------------------------------- 5. bad input
def test_bad_latents_shape(uncond):
    pipe = uncond[2]
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 8, 8, 3\) \(NHWC\)"):
        pipe(num_samples=2, latents=np.zeros((2, 3, 8, 8), np.float32))  # NCHW by mistake


def test_height_not_a_multiple_of_the_unet_factor(uncond):
    # VQ-f4 and one UNet downsampling: 8 pixels
    with pytest.raises(ValueError, match="height and width must be multiples of 8"):
        uncond[2](num_samples=1, rng=jax.random.key(0), height=36, width=32)


def test_image_size_not_a_multiple_of_the_unet_factor(inpaint_pipe):
    pipe, _ = inpaint_pipe
    with pytest.raises(ValueError, match="image's height and width must be multiples of 8"):
        pipe(image=np.zeros((1, 36, 32, 3), np.uint8), mask=np.zeros((1, 36, 32)),
             rng=jax.random.key(0))


def test_inpainting_mask_of_the_wrong_shape(inpaint_pipe):
    pipe, _ = inpaint_pipe
    image, mask = _inpaint_inputs()
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 32, 32\)"):
        pipe(image=image, mask=mask[:, :16], rng=jax.random.key(0))
    with pytest.raises(ValueError, match="inpainting needs mask="):
        pipe(image=image, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="needs image="):
        pipe(mask=mask, rng=jax.random.key(0))


def test_class_label_out_of_range(class_pipe):
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 1001\)"):
        class_pipe(class_labels=[3, 1001], rng=jax.random.key(0))
    with pytest.raises(ValueError, match="negative_prompt is for text-to-image models, not this 'class2img'"):
        class_pipe(class_labels=[3], negative_prompt="a dog", guidance_scale=2.0, rng=jax.random.key(0))


def test_guidance_without_unconditional_input(uncond, inpaint_pipe):
    with pytest.raises(ValueError, match="needs an unconditional input, which the 'uncond' task"):
        uncond[2](num_samples=1, rng=jax.random.key(0), guidance_scale=3.0)
    image, mask = _inpaint_inputs()
    with pytest.raises(ValueError, match="'inpaint' task does not have"):
        inpaint_pipe[0](image=image, mask=mask, rng=jax.random.key(0), guidance_scale=2.0)


def test_unknown_sampler(uncond):
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        uncond[2](num_samples=1, rng=jax.random.key(0), sampler="euler")


def test_unsupported_diffusers_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="is a StableDiffusionPipeline; latentdiff loads "
                                         "LDMTextToImagePipeline, LDMPipeline"):
        LatentDiffusionPipeline.from_pretrained(str(tmp_path))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*missing.ckpt"):
        LatentDiffusionPipeline.from_pretrained(str(tmp_path / "missing.ckpt"), config="x.yaml")
    with pytest.raises(FileNotFoundError, match="neither model_index.json"):
        LatentDiffusionPipeline.from_pretrained(str(tmp_path))
