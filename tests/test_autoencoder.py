"""Parity of the autoencoders with diffusers' PyTorch AutoencoderKL / VQModel (random weights)."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentdiff.models.autoencoder import AutoencoderConfig, make_autoencoder
from latentdiff.models.layers import forward_mode
from tests.torch_utils import flax_params_from_torch, nchw, nhwc, rel_err

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16)
KL_ATTN = dict(SMALL, down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D"),
               up_block_types=("UpDecoderBlock2D", "AttnUpDecoderBlock2D"), latent_channels=4)
VQ_NOMID = dict(SMALL, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3, vq_embed_dim=3,
                num_vq_embeddings=64, mid_block_add_attention=False)

# The released CompVis ddconfigs (`models/first_stage_models/*/config.yaml`).
_DD = dict(resolution=256, in_channels=3, out_ch=3, ch=128, num_res_blocks=2, dropout=0.0)
COMPVIS = {
    "kl-f8": (dict(_DD, double_z=True, z_channels=4, ch_mult=[1, 2, 4, 4], attn_resolutions=[]),
              4, None, 83.7e6),
    "kl-f16": (dict(_DD, double_z=True, z_channels=16, ch_mult=[1, 1, 2, 2, 4],
                    attn_resolutions=[16]), 16, None, 69.6e6),
    "vq-f4": (dict(_DD, double_z=False, z_channels=3, ch_mult=[1, 2, 4], attn_resolutions=[]),
              3, 8192, 55.3e6),
    "vq-f4-noattn": (dict(_DD, double_z=False, z_channels=3, ch_mult=[1, 2, 4],
                          attn_resolutions=[], attn_type="none"), 3, 8192, 53.2e6),
    "vq-f8": (dict(_DD, double_z=False, z_channels=4, ch_mult=[1, 2, 2, 4],
                   attn_resolutions=[32]), 4, 16384, 67.7e6),
}


def _image(shape=(2, 16, 16, 3), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _torch_model(cls, config):
    torch.manual_seed(0)
    return cls(**config).eval()


def _flax(torch_model, kind, config, dtype=jnp.float32):
    model = make_autoencoder(AutoencoderConfig.from_diffusers(config, kind), dtype=dtype)
    kwargs = dict(sample_posterior=False) if kind == "kl" else {}
    params = flax_params_from_torch(torch_model, model, jnp.zeros((1, 16, 16, 3)), **kwargs)
    return model, {"params": params}


@pytest.fixture(scope="module")
def kl_pair():
    tm = _torch_model(diffusers.AutoencoderKL, KL_ATTN)
    return tm, *_flax(tm, "kl", KL_ATTN)


@pytest.fixture(scope="module")
def vq_pair():
    tm = _torch_model(diffusers.VQModel, VQ_NOMID)
    with torch.no_grad():  # a spread-out codebook: no near-ties in the argmin
        tm.quantize.embedding.weight.normal_()
    return tm, *_flax(tm, "vq", VQ_NOMID)


def test_kl_encode_decode_kl_match_diffusers(kl_pair):
    tm, model, params = kl_pair
    x = _image()
    with torch.no_grad():
        dist = tm.encode(nchw(x)).latent_dist
        dec = tm.decode(dist.mean).sample
        kl_ref = dist.kl().numpy()
    post = model.apply(params, x, method="encode")
    assert rel_err(post.mean, nhwc(dist.mean)) <= TOL
    assert rel_err(post.logvar, nhwc(dist.logvar)) <= TOL
    assert rel_err(post.kl(), kl_ref) <= TOL
    out = model.apply(params, nhwc(dist.mean), method="decode")
    assert out.shape == (2, 16, 16, 3)
    assert rel_err(out, nhwc(dec)) <= TOL


def test_decoder_forward_mode_matches_torch_central_difference(kl_pair):
    """jax.jvp through the KL decoder (GroupNorm, mid attention, upsampling convolutions) in
    `forward_mode` against diffusers' float64 central difference along the same direction."""
    tm, model, params = kl_pair
    rng = np.random.default_rng(4)
    z = model.apply(params, _image(), method="encode").mean
    v = rng.standard_normal(z.shape)
    with jax.default_matmul_precision("highest"), forward_mode():
        decode = lambda a: model.apply(params, a, method="decode")  # noqa: E731
        _, tangent = jax.jvp(decode, (z,), (jnp.asarray(v, jnp.float32),))
    tm64, eps = copy.deepcopy(tm).double(), 1e-4
    with torch.no_grad():
        run = lambda s: tm64.decode(nchw(np.asarray(z)).double() + s * nchw(v)).sample  # noqa: E731
        ref = nhwc((run(eps) - run(-eps)) / (2 * eps))
    assert rel_err(tangent, ref) <= 1e-5, rel_err(tangent, ref)


def test_kl_call_samples_and_nll(kl_pair):
    _, model, params = kl_pair
    x, key = _image(), jax.random.key(1)
    rec, post = model.apply(params, x, rng=key)
    assert rec.shape == x.shape
    z = post.sample(key)
    assert not np.allclose(z, post.mode())
    assert rel_err(model.apply(params, z, method="decode"), rec) <= 1e-6
    z = post.mean + 0.5 * post.std
    nll = 0.5 * np.sum(np.log(2 * np.pi) + post.logvar + 0.25, axis=(1, 2, 3))
    assert rel_err(post.nll(z), nll) <= 1e-5


def test_vq_encode_quantize_decode_match_diffusers(vq_pair):
    tm, model, params = vq_pair
    x = _image()
    with torch.no_grad():
        h = tm.encode(nchw(x)).latents
        zq_ref, loss_ref, (_, _, idx_ref) = tm.quantize(h)
        dec = tm.decode(h).sample
    hj = model.apply(params, x, method="encode")
    assert rel_err(hj, nhwc(h)) <= TOL
    zq, loss, idx = model.apply(params, nhwc(h), method="quantize")
    assert idx.shape == (2, 8, 8)
    np.testing.assert_array_equal(np.asarray(idx).reshape(-1), idx_ref.numpy().reshape(-1))
    assert rel_err(zq, nhwc(zq_ref)) <= TOL
    assert abs(float(loss) - float(loss_ref)) <= TOL * abs(float(loss_ref))
    assert rel_err(model.apply(params, nhwc(h), method="decode"), nhwc(dec)) <= TOL
    by_index = model.apply(params, idx, method="decode_indices")
    assert rel_err(by_index, nhwc(dec)) <= TOL
    rec, loss2, idx2 = model.apply(params, x)
    assert rel_err(rec, nhwc(dec)) <= TOL and np.array_equal(idx2, idx)
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)


def test_vq_straight_through_and_legacy_beta(vq_pair):
    _, model, params = vq_pair
    h = jnp.asarray(_image((2, 8, 8, 3), seed=3))
    quantize = lambda p, h: model.apply(p, h, method="quantize")
    zq, vjp = jax.vjp(lambda h: quantize(params, h)[0], h)
    np.testing.assert_allclose(vjp(jnp.ones_like(zq))[0], 1.0)  # straight-through: identity
    g_p, g_h = jax.grad(lambda p, h: quantize(p, h)[1], argnums=(0, 1))(params, h)
    np.testing.assert_allclose(g_h, 2 * (h - zq) / h.size, rtol=1e-5, atol=1e-9)  # weight 1
    g_cb = g_p["params"]["quantize"]["embedding"]["embedding"]  # codebook term carries beta
    g_h_sum = np.asarray(g_h).reshape(-1, 3).sum(0)
    np.testing.assert_allclose(-np.asarray(g_cb).sum(0), 0.25 * g_h_sum, rtol=1e-4, atol=1e-9)


def test_mid_attention_flag_and_level_attention_in_tree(kl_pair, vq_pair):
    kl_params, vq_params = kl_pair[2]["params"], vq_pair[2]["params"]
    assert "attentions_0" in kl_params["encoder"]["mid_block"]
    assert "attentions_0" in kl_params["encoder"]["down_blocks_0"]
    assert "attentions_0" not in kl_params["encoder"]["down_blocks_1"]
    assert "attentions_1" in kl_params["decoder"]["up_blocks_1"]  # lowest-res-first order
    assert "attentions_0" not in kl_params["decoder"]["up_blocks_0"]
    assert "attentions_0" not in vq_params["encoder"]["mid_block"]
    assert "attentions_0" not in vq_params["decoder"]["mid_block"]


def test_bf16_compute_close_to_fp32(kl_pair):
    _, model, params = kl_pair
    model16 = make_autoencoder(model.config, dtype=jnp.bfloat16)
    x = _image()
    post, post16 = (m.apply(params, x, method="encode") for m in (model, model16))
    assert rel_err(post16.mean, post.mean) <= 2e-2
    assert rel_err(post16.logvar, post.logvar) <= 2e-2
    rec, rec16 = (m.apply(params, post.mean, method="decode") for m in (model, model16))
    assert rec16.dtype == jnp.bfloat16
    assert rel_err(rec16.astype(jnp.float32), rec) <= 2e-2


@pytest.mark.parametrize("name", sorted(COMPVIS))
def test_compvis_configs_parameter_count(name):
    ddconfig, embed_dim, n_embed, expected = COMPVIS[name]
    cfg = AutoencoderConfig.from_compvis(ddconfig, embed_dim, n_embed)
    assert cfg.kind == ("vq" if n_embed else "kl")
    model = make_autoencoder(cfg)
    kwargs = dict(sample_posterior=False) if cfg.kind == "kl" else {}
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                               **kwargs))
    count = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(shapes))
    assert abs(count - expected) <= 0.005 * expected, count


def test_from_diffusers_matches_from_compvis():
    sd_vae = dict(_class_name="AutoencoderKL", block_out_channels=[128, 256, 512, 512],
                  down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4,
                  latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=256,
                  act_fn="silu", scaling_factor=0.18215)
    kl_f8 = AutoencoderConfig.from_compvis(*COMPVIS["kl-f8"][:2])
    assert AutoencoderConfig.from_diffusers(sd_vae) == kl_f8
    vq_f8 = dict(_class_name="VQModel", block_out_channels=[128, 256, 256, 512],
                 down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
                 up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
                 latent_channels=4, layers_per_block=2, num_vq_embeddings=16384, sample_size=256)
    expected = AutoencoderConfig.from_compvis(*COMPVIS["vq-f8"][:3])
    assert AutoencoderConfig.from_diffusers(vq_f8) == expected


@pytest.mark.parametrize("bad", [
    dict(norm_type="spatial"), dict(act_fn="gelu"), dict(use_quant_conv=False),
    dict(down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D")),  # asymmetric
    dict(down_block_types=("SimpleDownBlock", "DownEncoderBlock2D")),
    dict(block_out_channels=(32, 64, 64)),
])
def test_from_diffusers_rejects_unsupported(bad):
    with pytest.raises(ValueError):
        AutoencoderConfig.from_diffusers({**VQ_NOMID, **bad}, "kl")


def test_from_compvis_rejects_unsupported():
    dd = COMPVIS["kl-f8"][0]
    with pytest.raises(ValueError):
        AutoencoderConfig.from_compvis(dict(dd, attn_type="linear"), 4)
    with pytest.raises(ValueError):
        AutoencoderConfig.from_compvis(dd, 4, n_embed=16)  # double_z with a codebook
