"""Every config in configs/ loads, stays valid under lock, and builds the paper's networks.

Parameter counts are taken abstractly (`jax.eval_shape`, nothing allocated) and compared with
`reference/compvis_inventory.md` §1a/§1b (analytic counts of the released CompVis configs).
"""
import functools
import glob
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from latentdiff.config_overrides import load_config_file, unknown_key_error
from latentdiff.convert import loaders
from latentdiff.models.autoencoder import AutoencoderConfig, make_autoencoder
from latentdiff.training.loop import compvis_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = {os.path.basename(p)[:-3]: p for p in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
         if not os.path.basename(p).startswith("__") and os.path.basename(p) != "sample.py"}  # training configs
TOL = 0.01

# UNet parameters of each released LDM (inventory §1a).
UNET_PARAMS = {
    "ldm_vq4_uncond": 274.1e6, "celebahq_ldm_vq4": 274.1e6, "ffhq_ldm_vq4": 274.1e6,
    "lsun_bedrooms_ldm_vq4": 274.1e6, "lsun_churches_ldm_kl8": 295.0e6, "cin_ldm_vq8": 395.0e6,
    "cin256_v2": 400.9e6, "txt2img_1p4b": 872.3e6, "text2img256": 403.6e6,
    "semantic_synthesis": 215.2e6, "bsr_sr": 113.6e6, "inpainting_big": 387.2e6,
}
# CompVis' BERTEmbedder counts include x-transformers' `to_logits` head (width x vocab + vocab),
# which no LDM uses; LDMBert (diffusers' layout) has no such head.
BERT_PARAMS_WITH_LOGITS = {"txt2img_1p4b": 582.0e6, "text2img256": 186.2e6}
# First-stage parameters: encoder + decoder + quant convs (+ codebook) (inventory §1).
AE_PARAMS = {
    "base_autoencoder": 83.7e6, "kl_f4": 55.3e6, "kl_f8": 83.7e6, "kl_f16": 69.6e6, "kl_f32": 103.9e6,
    "vq_f4": 55.3e6, "vq_f4_noattn": 53.2e6, "vq_f8": 67.7e6, "vq_f8_n256": 67.7e6, "vq_f16": 69.6e6,
}


@functools.lru_cache(maxsize=None)
def config(name):
    return load_config_file(PATHS[name])


def names(stage):
    return [n for n in PATHS if config(n).stage == stage]


def count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def leaf_paths(cfg, skip=(), prefix=""):
    """Dotted paths of every leaf, not descending into the dotted paths in `skip`."""
    out = set()
    for key, value in cfg.items():
        path = prefix + key
        if isinstance(value, ml_collections.ConfigDict) and path not in skip:
            out |= leaf_paths(value, skip, path + ".")
        else:
            out.add(path)
    return out


def close(n, expected):
    return abs(n - expected) <= TOL * expected


# ---------------------------------------------------------------------------- every file
@pytest.mark.parametrize("name", sorted(PATHS))
def test_loads_locks_and_overrides(name):
    cfg = load_config_file(PATHS[name])  # a fresh copy: this test mutates it
    assert isinstance(cfg, ml_collections.ConfigDict)
    assert cfg.stage in ("ldm", "autoencoder")
    cfg.lock()
    cfg.optim.lr = 1.0  # a nested override on a locked config
    assert cfg.optim.lr == 1.0
    cfg.seed = 7
    with pytest.raises(AttributeError):
        cfg.optim.no_such_key = 1
    with pytest.raises(AttributeError):
        cfg.no_such_group = 1
    with pytest.raises(TypeError):
        cfg.optim.lr = "fast"
    assert unknown_key_error(cfg, "optim.lr") is None
    assert "valid keys" in unknown_key_error(cfg, "optim.lrr")


@pytest.mark.parametrize("name", sorted(PATHS))
def test_only_the_base_keys(name):
    """A derived config only sets keys of its stage's base (the params of the conditioning model
    are free-form: they depend on its target)."""
    cfg = config(name)
    skip = ("model.cond_stage_config.params", "autoencoder")
    base = config("base_ldm" if cfg.stage == "ldm" else "base_autoencoder")
    optional = {"autoencoder"}  # an LDM's first stage to train first (the demos)
    assert leaf_paths(cfg, skip) - optional == leaf_paths(base, skip)


def test_every_released_model_is_checked():
    released = set(UNET_PARAMS) | set(AE_PARAMS)
    assert released <= set(PATHS)
    demos = {n for n in PATHS if n.startswith(("base_", "tiny_", "demo", "shapes_"))}  # bases, tests, demos
    unchecked = set(names("ldm")) - set(UNET_PARAMS) - demos
    unchecked |= set(names("autoencoder")) - set(AE_PARAMS) - demos
    assert not unchecked, f"configs without a parameter count to check: {sorted(unchecked)}"


# ---------------------------------------------------------------------------- LDM stage
@functools.lru_cache(maxsize=None)
def ldm_spec(name):
    return loaders.build_ldm(compvis_params(config(name).model))


@functools.lru_cache(maxsize=None)
def unet_size(unet_config):
    """Parameters of a UNet (configs that share a network trace it once)."""
    unet = loaders.UNet(unet_config)
    example = loaders.unet_example(unet, unet_config.size_multiple)
    return count(loaders.abstract_params(unet, *example))


@pytest.mark.parametrize("name", names("ldm"))
def test_ldm_config_builds_with_paper_unet_size(name):
    cfg, spec = config(name), ldm_spec(name)
    m, unet = cfg.model, spec["unet"]
    # shapes agree with each other: latent size and channels, first stage factor, image size
    fs = m.first_stage_config.params
    assert m.unet_config.params.image_size == m.image_size
    assert m.unet_config.params.out_channels == m.channels == fs.embed_dim
    assert m.image_size * spec["config"].vae_scale == cfg.data.size == fs.ddconfig.resolution
    if m.conditioning_key != "concat":
        assert m.unet_config.params.in_channels == m.channels
    assert (fs.n_embed > 0) == ("VQ" in m.first_stage_config.target)
    n = unet_size(unet.config)
    if name in UNET_PARAMS:
        assert close(n, UNET_PARAMS[name]), f"{name}: {n / 1e6:.2f}M, paper {UNET_PARAMS[name] / 1e6}M"


@pytest.mark.parametrize("name", sorted(BERT_PARAMS_WITH_LOGITS))
def test_text_encoder_size(name):
    """LDMBert has no to_logits head: its count plus that head's is CompVis' BERTEmbedder's."""
    model = ldm_spec(name)["cond_model"]
    n = count(loaders.abstract_params(model, *loaders.cond_example(model)))
    to_logits = model.config.width * model.config.vocab_size + model.config.vocab_size
    assert close(n + to_logits, BERT_PARAMS_WITH_LOGITS[name]), n
    if name == "txt2img_1p4b":
        assert close(n, 542.9e6), n


def test_txt2img_text_and_guidance_settings():
    m = config("txt2img_1p4b").model
    assert m.cond_stage_config.vocab == ""  # a path the user passes at run time
    assert m.cond_drop_prob > 0 and config("cin256_v2").model.cond_drop_prob > 0
    assert ldm_spec("txt2img_1p4b")["unet"].config.remat
    assert ldm_spec("cin256_v2")["config"].null_class == 1000


# ---------------------------------------------------------------------------- autoencoder stage
@functools.lru_cache(maxsize=None)
def autoencoder_size(ae):
    model = make_autoencoder(ae)
    side = 2 ** len(ae.ch_mult)
    kwargs = dict(sample_posterior=False) if ae.kind == "kl" else {}
    return count(loaders.abstract_params(model, jnp.zeros((1, side, side, ae.in_channels)), **kwargs))


@pytest.mark.parametrize("name", names("autoencoder"))
def test_autoencoder_config_builds_with_paper_size(name):
    m = config(name).model
    assert m.target in ("kl", "vq")
    assert m.loss.disc_loss in ("hinge", "vanilla")
    ae = AutoencoderConfig.from_compvis(m.ddconfig.to_dict(), m.embed_dim, m.n_embed or None)
    assert ae.kind == m.target
    n = autoencoder_size(ae)
    if name in AE_PARAMS:
        assert close(n, AE_PARAMS[name]), f"{name}: {n / 1e6:.2f}M, paper {AE_PARAMS[name] / 1e6}M"
