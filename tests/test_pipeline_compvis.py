"""End to end: a CompVis-layout class-conditional `.ckpt` + YAML, with classifier-free guidance.

The reference is the same model run in PyTorch (diffusers modules, DDIMScheduler with the paper's
+1 offset, batched guidance, null class 1000 as in cin256-v2).
"""
import jax
import numpy as np
import pytest
import yaml

from latentdiff import LatentDiffusionPipeline
from tests.ldm_fixtures import compvis_autoencoder_names, compvis_unet_names, perturb_, psnr

torch = pytest.importorskip("torch")
LABELS = [3, 999]


def _build(tmp):
    from diffusers import UNet2DConditionModel, VQModel

    torch.manual_seed(0)
    unet = perturb_(UNet2DConditionModel(
        sample_size=4, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=1, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0),
        seed=1).eval()
    vq = perturb_(VQModel(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=3, num_vq_embeddings=64, vq_embed_dim=3, norm_num_groups=32, sample_size=16),
        seed=2).eval()
    embed = torch.nn.Embedding(1001, 32)
    sd = {}
    unet_sd = {k: v.numpy() for k, v in unet.state_dict().items()}
    for k, v in compvis_unet_names(unet_sd, 1, [False, True]).items():
        sd["model.diffusion_model." + k] = torch.from_numpy(v)
        # EMA copy holds the real weights; the raw copy is garbage so the test sees which is used
        sd["model_ema." + ("diffusion_model." + k).replace(".", "")] = torch.from_numpy(v)
        sd["model.diffusion_model." + k] = torch.from_numpy(v + 1.0)
    vq_sd = {k: v.numpy() for k, v in vq.state_dict().items()}
    for k, v in compvis_autoencoder_names(vq_sd, 3).items():
        sd["first_stage_model." + k] = torch.from_numpy(np.ascontiguousarray(v))
    sd["cond_stage_model.embedding.weight"] = embed.weight.detach().clone()
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    ckpt = str(tmp / "model.ckpt")
    torch.save({"state_dict": sd, "global_step": 10}, ckpt)
    cfg = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "first_stage_key": "image",
        "cond_stage_key": "class_label", "image_size": 4, "channels": 3, "cond_stage_trainable": True,
        "conditioning_key": "crossattn",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 4, "in_channels": 3, "out_channels": 3, "model_channels": 32,
            "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 1,
            "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 32}},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
            "embed_dim": 3, "n_embed": 64, "ddconfig": {
                "double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3,
                "ch": 32, "ch_mult": [1, 1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                "dropout": 0.0}, "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                              "params": {"n_classes": 1001, "embed_dim": 32, "key": "class_label"}}}}}
    path = str(tmp / "model.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return ckpt, path, (unet, vq, embed)


def _reference(models, latents_nhwc, steps, guidance):
    from diffusers import DDIMScheduler

    unet, vq, embed = models
    sched = DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(steps)
    x = torch.from_numpy(np.ascontiguousarray(latents_nhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        c = embed(torch.tensor(LABELS))[:, None]
        uc = embed(torch.tensor([1000] * len(LABELS)))[:, None]
        for t in sched.timesteps:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uc, c])).sample
            e_u, e_c = out.chunk(2)
            x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
        img = vq.decode(x).sample
    img = ((img / 2 + 0.5).clamp(0, 1)).numpy().transpose(0, 2, 3, 1)
    return np.round(img * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("compvis"))


def test_class_conditional_with_guidance_matches_reference(checkpoint):
    ckpt, cfg, models = checkpoint
    pipe = LatentDiffusionPipeline.from_pretrained(ckpt, config=cfg)
    assert pipe.config.task == "class2img" and pipe.config.null_class == 1000
    latents = np.asarray(jax.random.normal(jax.random.key(0), (2, 4, 4, 3)))
    img = pipe(class_labels=LABELS, latents=latents, num_inference_steps=10, guidance_scale=3.0)
    ref = _reference(models, latents, 10, 3.0)
    assert img.shape == (2, 16, 16, 3) and img.std() > 5
    assert psnr(img, ref) >= 40.0


def test_raw_weights_differ_from_ema(checkpoint):
    ckpt, cfg, models = checkpoint
    latents = np.asarray(jax.random.normal(jax.random.key(0), (2, 4, 4, 3)))
    kw = dict(class_labels=LABELS, latents=latents, num_inference_steps=5, guidance_scale=3.0)
    ema = LatentDiffusionPipeline.from_pretrained(ckpt, config=cfg)(**kw)
    raw = LatentDiffusionPipeline.from_pretrained(ckpt, config=cfg, use_ema=False)(**kw)
    assert psnr(ema, raw) < 30.0


def test_mismatching_checkpoint_names_the_parameter(checkpoint, tmp_path):
    ckpt, cfg, _ = checkpoint
    spec = yaml.safe_load(open(cfg))
    spec["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    from latentdiff.convert.torch_names import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match=r"parameter '[\w/]+' \(unet\) does not fit"):
        LatentDiffusionPipeline.from_pretrained(ckpt, config=str(bad))
