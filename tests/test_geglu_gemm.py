"""GEGLU's projection with its gate as the GEMM's epilogue (`geglu_gemm`), run on the CPU by Pallas'
GPU interpreter: the kernel against the float32 reference, and the UNet's GEGLU through it against
XLA's path (values, and gradients that XLA's path computes either way)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentdiff.models import geglu_gemm
from latentdiff.models.layers import geglu
from latentdiff.models.unet import GEGLU

interpret = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")


def _params(m, k, i, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (k, 2 * i)) / k ** 0.5).astype(jnp.bfloat16)
    return x, w, jax.random.normal(keys[2], (2 * i,))


def _interpreted(sms=2):
    return functools.partial(geglu_gemm.geglu_matmul, sms=sms, interpret=interpret.InterpretGPUParams(
        detect_races=True, uninitialized_memory="nan"))


@pytest.mark.parametrize("tiles", [geglu_gemm.Tiles(split="m", stages=2),
                                   geglu_gemm.Tiles(split="n", minor="n", group=2)], ids=["rows", "blocks"])
def test_kernel_matches_float32_reference(tiles):
    """Several tiles per CTA (1024 rows, 2 CTAs), three pipeline steps, the gates 256 columns after their
    values in the weight as stored; bf16 output rounding only."""
    x, w, b = _params(1024, 192, 256)
    ref = geglu(x.astype(jnp.float32) @ w.astype(jnp.float32) + b)
    out = _interpreted()(x, w, b, tiles)
    assert out.shape == (1024, 256) and out.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
    assert err <= 8e-3, err
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    assert not gpu_callbacks.get_races().races_found


def test_kernel_refuses_shapes_off_its_tiles():
    x, w, b = _params(256, 64, 96)  # 96 gate columns: not a multiple of the warpgroup's 64
    assert not geglu_gemm.fits(256, 64, 2 * 96)
    with pytest.raises(ValueError, match="does not split"):
        geglu_gemm.geglu_matmul(x, w, b)


def test_unet_geglu_through_the_kernel(monkeypatch):
    """Forced on (as on a Hopper GPU), the UNet's GEGLU runs the kernel when nothing differentiates
    it, close to XLA's path in bf16, and its gradients are XLA's path's, exactly."""
    x = jax.random.normal(jax.random.key(3), (2, 256, 64), jnp.bfloat16)
    module = GEGLU(128, dtype=jnp.bfloat16)
    params = module.init(jax.random.key(4), x)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(5), p.shape), params)
    xla_out = module.apply(params, x)
    loss = lambda p, a: jnp.sum(module.apply(p, a).astype(jnp.float32) ** 2)  # noqa: E731
    xla_grads = jax.grad(loss, argnums=(0, 1))(params, x)
    calls = []
    kernel = _interpreted()
    monkeypatch.setattr(geglu_gemm, "_kernel_ok", lambda *args: True)
    monkeypatch.setattr(geglu_gemm, "geglu_matmul", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    out = module.apply(params, x)
    assert calls == [1]
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - xla_out.astype(jnp.float32))) / jnp.max(jnp.abs(xla_out)))
    assert 0 < err <= 1e-2, err
    grads = jax.grad(loss, argnums=(0, 1))(params, x)
    assert calls == [1]
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(xla_grads)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_erf_matches_lax():
    """The epilogue's rational erf (Mosaic GPU has no erf rule) against XLA's, across and past its clamp."""
    x = jnp.linspace(-9.0, 9.0, 100_001, dtype=jnp.float32)
    assert float(jnp.max(jnp.abs(geglu_gemm.erf(x) - jax.lax.erf(x)))) <= 1e-6
