"""End to end: a diffusers LDMTextToImagePipeline folder sampled by diffusers and by us."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentdiff import LatentDiffusionPipeline
from tests.ldm_fixtures import ldm_text2img_folder, psnr

torch = pytest.importorskip("torch")
PROMPTS = ["a painting of a squirrel eating a burger", "a red circle at the top left"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ldm_text2img"))
    return path, ldm_text2img_folder(path)


def _reference(pipe, latents_nhwc, steps, guidance, eta=0.0):
    lat = torch.from_numpy(np.ascontiguousarray(latents_nhwc.transpose(0, 3, 1, 2)))
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, eta=eta,
               latents=lat, output_type="np")
    return np.round(out.images * 255).astype(np.uint8)


@pytest.mark.parametrize("guidance", [6.0, 1.0])
def test_same_images_as_diffusers(folder, guidance):
    path, ref_pipe = folder
    latents = np.asarray(jax.random.normal(jax.random.key(1), (2, 4, 4, 4)))
    ours = LatentDiffusionPipeline.from_pretrained(path)
    img = ours(PROMPTS, latents=latents, num_inference_steps=10, guidance_scale=guidance,
               height=32, width=32)
    ref = _reference(ref_pipe, latents, 10, guidance)
    assert img.dtype == np.uint8 and img.shape == (2, 32, 32, 3)
    assert img.std() > 5  # not a flat image
    assert psnr(img, ref) >= 40.0


def test_negative_prompt_matches_diffusers_with_that_unconditional_text(folder, monkeypatch):
    """negative_prompt (one per prompt) against diffusers' pipeline whose tokenizer is handed the
    same texts in place of its empty unconditional prompts; a text shared by all is one row."""
    path, ref_pipe = folder
    negatives = ["a red circle", "the squirrel"]
    latents = np.asarray(jax.random.normal(jax.random.key(3), (2, 4, 4, 4)))
    ours = LatentDiffusionPipeline.from_pretrained(path)
    kw = dict(latents=latents, num_inference_steps=10, guidance_scale=6.0, height=32, width=32)
    img = ours(PROMPTS, negative_prompt=negatives, **kw)
    tokenize = type(ref_pipe.tokenizer).__call__
    monkeypatch.setattr(type(ref_pipe.tokenizer), "__call__", lambda self, text, *a, **k: tokenize(
        self, negatives if text == [""] * len(negatives) else text, *a, **k))
    ref = _reference(ref_pipe, latents, 10, 6.0)
    assert np.abs(img.astype(int) - ref).max() <= 1
    plain = ours(PROMPTS, **kw)
    assert np.abs(img.astype(int) - plain).mean() > 0.3  # the negative prompt moves them (0.6 here)
    np.testing.assert_array_equal(ours(PROMPTS, negative_prompt="", **kw), plain)
    shared = ours(PROMPTS, negative_prompt="the squirrel", **kw)
    np.testing.assert_array_equal(ours(PROMPTS, negative_prompt=["the squirrel"] * 2, **kw), shared)
    for negative in (None, "", "the squirrel", ["the squirrel"] * 2):
        _, uncond, batch = ours._conditioning(PROMPTS, None, None, None, None, negative)
        assert batch == 2 and uncond.shape[0] == 1  # encoded once, broadcast in the program
    with pytest.raises(ValueError, match=r"one text or one per prompt \(2\), got 3"):
        ours(PROMPTS, negative_prompt=["a", "b", "c"], **kw)
    with pytest.raises(ValueError, match="negative_prompt acts through guidance"):
        ours(PROMPTS, negative_prompt="the squirrel", **dict(kw, guidance_scale=1.0))


def test_bf16_latents_close_to_fp32(folder):
    """bf16 compute, with fp32 and with bf16 weights, against fp32: the default 50 DDIM steps at
    guidance 6; bf16 weights are half the bytes."""
    path, _ = folder
    latents = np.asarray(jax.random.normal(jax.random.key(2), (2, 4, 4, 4)))
    kw = dict(latents=latents, num_inference_steps=50, guidance_scale=6.0, output_type="latents")
    p32 = LatentDiffusionPipeline.from_pretrained(path)
    z32 = p32(PROMPTS, **kw)
    for param_dtype in (jnp.float32, jnp.bfloat16):
        pipe = LatentDiffusionPipeline.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=param_dtype)
        assert {a.dtype for a in jax.tree.leaves(pipe.params)} == {jnp.dtype(param_dtype)}
        z16 = pipe(PROMPTS, **kw)
        diff = np.asarray(z16, np.float64) - z32
        rel = np.linalg.norm(diff) / np.linalg.norm(z32)
        print("bf16 vs fp32 relative L2", param_dtype, rel, "max-abs/max", np.abs(diff).max() / np.abs(z32).max())
        assert rel <= 1e-2, rel
    nbytes = lambda p: sum(a.nbytes for a in jax.tree.leaves(p.params))  # noqa: E731
    assert nbytes(pipe) * 2 == nbytes(p32)
    with pytest.raises(ValueError, match="param_dtype must be a floating dtype"):
        LatentDiffusionPipeline.from_pretrained(path, param_dtype=jnp.int8)


def test_sample_py_stores_weights_as_its_dtype_says(folder):
    """sample.py's `param_dtype` ('' = as `dtype`) reaches the loaded weights; other names are user errors."""
    from configs.sample import get_config
    from latentdiff.sampling import UserInputError, load

    c = get_config()
    c.pretrained, c.dtype = folder[0], "bfloat16"
    for param_dtype, expected in (("", jnp.bfloat16), ("float32", jnp.float32)):
        c.param_dtype = param_dtype
        assert {a.dtype for a in jax.tree.leaves(load(c, LatentDiffusionPipeline).params)} == {jnp.dtype(expected)}
    c.param_dtype = "int8"
    with pytest.raises(UserInputError, match="param_dtype must be 'float32' or 'bfloat16'"):
        load(c, LatentDiffusionPipeline)


def test_seed_usage_from_design(folder):
    """The README/DESIGN usage: 50 steps, eta 0.3, guidance 6, a batch of prompts, a JAX key."""
    path, _ = folder
    pipe = LatentDiffusionPipeline.from_pretrained(path)
    images = pipe(PROMPTS, rng=jax.random.key(42), num_inference_steps=50, guidance_scale=6.0,
                  eta=0.3)
    again = pipe(PROMPTS, rng=jax.random.key(42), num_inference_steps=50, guidance_scale=6.0,
                 eta=0.3)
    other = pipe(PROMPTS, rng=jax.random.key(43), num_inference_steps=50, guidance_scale=6.0,
                 eta=0.3)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, again)
    assert np.abs(images.astype(int) - other).mean() > 1.0


def test_eta_noise_matches_diffusers_in_distribution(folder):
    """eta > 0 adds noise: samples from different keys differ; eta 0 from the same latents do not."""
    path, _ = folder
    pipe = LatentDiffusionPipeline.from_pretrained(path)
    latents = np.asarray(jax.random.normal(jax.random.key(3), (2, 4, 4, 4)))
    kw = dict(latents=latents, num_inference_steps=10, output_type="latents")
    a = pipe(PROMPTS, rng=jax.random.key(0), eta=0.0, **kw)
    b = pipe(PROMPTS, rng=jax.random.key(1), eta=0.0, **kw)
    c = pipe(PROMPTS, rng=jax.random.key(1), eta=1.0, **kw)
    np.testing.assert_array_equal(a, b)
    assert np.abs(c - a).mean() > 1e-3
