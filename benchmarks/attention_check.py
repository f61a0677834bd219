"""Check on a GPU that the automatic attention path uses cuDNN where it can and agrees with XLA.

    python benchmarks/attention_check.py          # prints one line per case, then the UNet check
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from latentdiff.models import attention as attn_mod
from latentdiff.models.unet import UNet, UNetConfig


def _time(f, *args, n=10):
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(n):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def attention_cases():
    for b, t, s, h, d in [(16, 1024, 1024, 8, 40), (16, 256, 256, 8, 80), (16, 64, 64, 8, 160),
                          (16, 1024, 77, 8, 40), (4, 4096, 4096, 1, 192), (16, 4096, 4096, 7, 32)]:
        ks = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(ks[0], (b, t, h, d), jnp.bfloat16)
        k = jax.random.normal(ks[1], (b, s, h, d), jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, s, h, d), jnp.bfloat16)
        try:
            jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            cudnn = "yes"
        except Exception as e:  # noqa: BLE001 - report why cuDNN refused
            cudnn = f"no ({type(e).__name__})"
        auto = jax.jit(lambda q, k, v: attn_mod.attention(q, k, v))
        xla = jax.jit(lambda q, k, v: attn_mod.attention(q, k, v, implementation="xla"))
        ref = np.asarray(xla(q, k, v), np.float32)
        err = np.abs(np.asarray(auto(q, k, v), np.float32) - ref).max() / np.abs(ref).max()
        print(f"attention b{b} t{t} s{s} h{h} d{d}: cudnn={cudnn} auto-vs-xla rel {err:.2e} "
              f"auto {_time(auto, q, k, v) * 1e3:.2f} ms xla {_time(xla, q, k, v) * 1e3:.2f} ms")


def remat_grad_case():
    """Gradients under activation checkpointing (the 1.45B config's use_checkpoint) with 77 tokens:
    the UNet's cross-attention (77 keys) and LDMBert's self-attention (77 queries and keys). The
    backward pass is traced after the forward returns; auto against XLA."""
    for name, (b, t, h, d) in {"cross-attention, 1024 queries": (8, 1024, 8, 40),
                               "self-attention, 77 queries": (8, 77, 8, 64)}.items():
        ks = jax.random.split(jax.random.key(4), 3)
        q = jax.random.normal(ks[0], (b, t, h, d), jnp.bfloat16)
        k, v = (jax.random.normal(key, (b, 77, h, d), jnp.bfloat16) for key in ks[1:])

        def grads(impl):
            loss = jax.checkpoint(lambda q, k, v: jnp.sum(attn_mod.attention(q, k, v, implementation=impl)
                                                          .astype(jnp.float32) ** 2))
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

        errs = [np.abs(np.asarray(a, np.float32) - np.asarray(r, np.float32)).max()
                / np.abs(np.asarray(r, np.float32)).max() for a, r in zip(grads(None), grads("xla"))]
        print(f"{name}, 77 keys, gradient under remat: auto-vs-xla rel " + " ".join(f"{e:.2e}" for e in errs))


def unet_case(batch=8):
    cfg = UNetConfig.from_compvis(dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
        transformer_depth=1, context_dim=1280, legacy=False))
    x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 4))
    t = jnp.full((batch,), 500)
    ctx = jax.random.normal(jax.random.key(2), (batch, 77, 1280))
    params = jax.jit(UNet(cfg).init)(jax.random.key(0), x, t, ctx)["params"]
    params = jax.tree_util.tree_map(lambda p: p + 0.01 * jax.random.normal(jax.random.key(3), p.shape), params)
    f32 = jax.jit(lambda p: UNet(cfg).apply({"params": p}, x, t, ctx))
    bf16 = jax.jit(lambda p: UNet(cfg, dtype=jnp.bfloat16).apply({"params": p}, x, t, ctx))
    ref = np.asarray(f32(params))
    out = np.asarray(bf16(params), np.float32)
    print(f"txt2img UNet batch {batch}: bf16 (auto attention) vs fp32 rel L2 "
          f"{np.linalg.norm(out - ref) / np.linalg.norm(ref):.2e}; fwd bf16 {_time(bf16, params) * 1e3:.1f} ms, "
          f"fp32 {_time(f32, params) * 1e3:.1f} ms")


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")  # a true fp32 reference
    print(jax.devices())
    attention_cases()
    remat_grad_case()
    unet_case()
