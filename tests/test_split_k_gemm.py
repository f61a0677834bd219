"""The split-K GEMM (`split_k_gemm`), run on the CPU by Pallas' GPU interpreter: its float32 partials
against the float32 product of each slice, and a `Conv2D` through it against cuDNN's path (XLA's
convolution: values, and gradients that XLA's path computes either way)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentdiff.models import split_k_gemm
from latentdiff.models.layers import Conv2D

interpret = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")


def _interpreted(sms=2):
    return functools.partial(split_k_gemm.split_k_matmul, sms=sms, interpret=interpret.InterpretGPUParams(
        detect_races=True, uninitialized_memory="nan"))


@pytest.mark.parametrize("tiles", [split_k_gemm.Tiles(stages=2), split_k_gemm.Tiles(cols=64)], ids=["128", "64"])
def test_partials_match_float32_slices(tiles):
    """Three slices of the reduction, two steps each; 2 CTAs walk the 3 x 2 x (1 or 2) tiles."""
    kx, kw = jax.random.split(jax.random.key(0))
    m, k, n, splits = 256, 384, 128, 3
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (n, k), jnp.bfloat16)
    partials = _interpreted()(x, w, splits, tiles)
    assert partials.shape == (splits, m, n) and partials.dtype == jnp.float32
    slices = jnp.stack([x[:, i * 128:(i + 1) * 128].astype(jnp.float32) @ w[:, i * 128:(i + 1) * 128].T.astype(jnp.float32)
                        for i in range(splits)])
    np.testing.assert_allclose(np.asarray(partials), np.asarray(slices), rtol=1e-5, atol=1e-4)
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    assert not gpu_callbacks.get_races().races_found


def test_refuses_shapes_off_its_tiles():
    x, w = jnp.zeros((256, 192), jnp.bfloat16), jnp.zeros((128, 192), jnp.bfloat16)
    assert split_k_gemm.fits(256, 192, 128, 3) and not split_k_gemm.fits(256, 192, 128, 2)
    with pytest.raises(ValueError, match="does not split"):
        split_k_gemm.split_k_matmul(x, w, 2)
    with pytest.raises(ValueError, match="does not split"):
        split_k_gemm.split_k_matmul(x[:96], w, 3)


def test_splits_fill_the_sms_only_where_tiles_leave_them_idle():
    sms = 132
    assert split_k_gemm.splits_for(512, 9 * 1280, 1280, sms) == 3  # 4x4 level, batch 16 guided: 40 tiles
    assert split_k_gemm.splits_for(512, 9 * 2560, 1280, sms) == 3
    assert split_k_gemm.splits_for(256, 9 * 1280, 1280, sms) == 6  # batch 8: 20 tiles
    assert split_k_gemm.splits_for(2048, 9 * 1280, 1280, sms) == 1  # 8x8 level: 160 tiles
    assert split_k_gemm.splits_for(32, 9 * 1280, 1280, sms) == 1  # batch 1: no whole row tile
    assert split_k_gemm.splits_for(512, 9 * 320, 320, sms) == 1  # 320 columns: no whole column tile


@pytest.mark.parametrize("stride", [1, 2])
def test_taps_side_by_side_are_the_convolution(stride):
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (2, 6, 5, 3))
    kernel = jax.random.normal(kw, (4, 3, 3, 3))
    taps = split_k_gemm.taps_side_by_side(x, stride)
    out = jnp.einsum("bhwk,ok->bhwo", taps, kernel.reshape(4, -1), precision="highest")
    ref = jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(1, 1)] * 2,
                                       dimension_numbers=("NHWC", "OHWI", "NHWC"), precision="highest")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_through_the_kernel(monkeypatch, stride):
    """Forced on (as on a Hopper GPU), a bf16 Conv2D runs the split-K kernel when nothing differentiates
    it, close to XLA's convolution, and its gradients are XLA's path's, exactly."""
    x = jax.random.normal(jax.random.key(3), (2, 8 * stride, 8 * stride, 64), jnp.bfloat16)
    module = Conv2D(128, 3, stride, 1, dtype=jnp.bfloat16)
    params = module.init(jax.random.key(4), x)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(5), p.shape), params)
    xla_out = module.apply(params, x)
    loss = lambda p, a: jnp.sum(module.apply(p, a).astype(jnp.float32) ** 2)  # noqa: E731
    xla_grads = jax.grad(loss, argnums=(0, 1))(params, x)
    calls = []
    kernel = _interpreted()
    monkeypatch.setattr(split_k_gemm, "conv_splits", lambda *args: 3)
    monkeypatch.setattr(split_k_gemm, "split_k_matmul", lambda *a, **k: calls.append(a[2]) or kernel(*a, **k))
    out = module.apply(params, x)
    assert calls == [3] and out.shape == xla_out.shape
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - xla_out.astype(jnp.float32))) / jnp.max(jnp.abs(xla_out)))
    assert err <= 1e-2, err
    grads = jax.grad(loss, argnums=(0, 1))(params, x)
    assert calls == [3]
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(xla_grads)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_conv_splits_stay_off_the_cpu():
    x, kernel = jnp.zeros((32, 4, 4, 1280), jnp.bfloat16), jnp.zeros((1280, 3, 3, 1280), jnp.bfloat16)
    assert split_k_gemm.conv_splits(x, kernel, 1, 1, jnp.bfloat16) == 1
