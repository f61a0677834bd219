"""The one attention function every attention layer calls.

`attention(q, k, v)` takes (batch, length, heads, head_dim) arrays and runs
`jax.nn.dot_product_attention`: cuDNN's fused flash attention on a GPU when the compute dtype is
bf16/fp16 and the head size allows it, XLA otherwise (softmax in float32 either way).
"""
import jax
import jax.numpy as jnp

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 256


def _cudnn_ok(q, k):
    return (jax.default_backend() == "gpu" and q.dtype in _CUDNN_DTYPES
            and q.shape[-1] <= _CUDNN_MAX_HEAD_DIM and q.shape[-1] % 8 == 0
            and k.shape[1] >= 1)


def attention(q, k, v, scale=None, implementation=None):
    """Softmax attention over (B, T, H, D) inputs; returns (B, T, H, D) in q's dtype.

    `implementation` is None (automatic), 'cudnn' or 'xla'.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if implementation is None:
        implementation = "cudnn" if _cudnn_ok(q, k) else "xla"
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        except Exception:  # unsupported shape/version: XLA computes the same thing
            pass
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")


def split_heads(x, heads):
    """(B, T, heads*D) -> (B, T, heads, D)."""
    b, t, c = x.shape
    return x.reshape(b, t, heads, c // heads)


def merge_heads(x):
    """(B, T, heads, D) -> (B, T, heads*D)."""
    b, t, h, d = x.shape
    return x.reshape(b, t, h * d)
