"""The one attention function every attention layer calls.

`attention(q, k, v)` takes (batch, length, heads, head_dim) arrays and runs
`jax.nn.dot_product_attention`: cuDNN's fused flash attention on a GPU when the compute dtype is
bf16/fp16 and the head size allows it, XLA otherwise (softmax in float32 either way). XLA's
attention recomputes its scores in the backward pass, as flash attention does, instead of keeping
them (`_xla_attention`). In `layers.forward_mode` it takes XLA's path, which has a forward-mode
derivative (cuDNN's has none).
"""
import jax
import jax.numpy as jnp

from latentdiff.models.layers import dense, in_forward_mode

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 256
LENGTH_MULTIPLE = 8  # cuDNN's attention takes lengths that this divides (with a mask, in training)


def _cudnn_ok(q):
    return (jax.default_backend() == "gpu" and q.dtype in _CUDNN_DTYPES
            and q.shape[-1] <= _CUDNN_MAX_HEAD_DIM and q.shape[-1] % 8 == 0)


def pad_length(x, multiple=LENGTH_MULTIPLE):
    """x zero-padded along axis 1 to a multiple of `multiple`."""
    extra = -x.shape[1] % multiple
    return jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2)) if extra else x


def _key_lengths(k, kv_length):
    """The true key length per batch row (int32) for the padding mask, None if all keys count."""
    if kv_length is None or kv_length == k.shape[1]:
        return None
    return jnp.full((k.shape[0],), kv_length, jnp.int32)


def pad_lengths(q, k, v, multiple=LENGTH_MULTIPLE, kv_length=None):
    """q, k, v zero-padded along their lengths to a multiple of `multiple`, with the true key length
    per batch row (int32) for the attention's padding mask, None if all keys count. `kv_length`:
    the keys beyond it are padding already. Padded queries attend like the others; their rows of
    the output are to be dropped."""
    qp, kp, vp = (pad_length(x, multiple) for x in (q, k, v))
    return qp, kp, vp, _key_lengths(kp, k.shape[1] if kv_length is None else kv_length)


def _cudnn_attention(q, k, v, scale, kv_length):
    """cuDNN flash attention, or None where it refuses the shapes. Lengths that 8 does not divide
    (the 77 tokens of text), which cuDNN refuses when training with a mask, are padded up front
    (`pad_lengths`): under activation checkpointing the backward rule is traced after this function
    returns, where a refusal could no longer fall back to XLA."""
    t = q.shape[1]
    q, k, v, lengths = pad_lengths(q, k, v, kv_length=kv_length)
    try:
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=lengths,
                                           implementation="cudnn")
    except Exception:  # unsupported shape/version
        return None
    return out[:, :t]


def attention(q, k, v, scale=None, implementation=None, kv_length=None):
    """Softmax attention over (B, T, H, D) inputs; returns (B, T, H, D) in q's dtype.

    `implementation` is None (automatic: 'xla' in `layers.forward_mode`), 'cudnn' or 'xla'; 'cudnn'
    falls back to XLA, which computes the same thing, where cuDNN refuses the shapes. `kv_length`:
    only the first kv_length keys and values count (the rest pad them, `pad_length`); None: all of them.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if implementation is None:
        implementation = "cudnn" if _cudnn_ok(q) and not in_forward_mode() else "xla"
    if implementation == "cudnn":
        out = _cudnn_attention(q, k, v, scale, kv_length)
        if out is not None:
            return out
    return _xla_attention(q, k, v, scale, kv_length)


def _xla_attention(q, k, v, scale, kv_length=None):
    """XLA's attention, its (batch, heads, queries, keys) softmax recomputed from q, k and v in the
    backward pass rather than kept from the forward pass. cin256-v2's single heads of 384-960
    channels, which cuDNN refuses, kept float32 and bf16 scores of 64 x 1024 x 1024 per layer at
    32 x 32: the recompute took its training step's peak from 21.90 to 19.90 GiB on an H200 (the
    compiled PyTorch peer's: 20.99), and the step from 0.1278 to 0.1247 s."""
    lengths = _key_lengths(k, kv_length)
    return jax.checkpoint(lambda a, b, c: jax.nn.dot_product_attention(
        a, b, c, scale=scale, key_value_seq_lengths=lengths, implementation="xla"))(q, k, v)


def split_heads(x, heads):
    """(B, T, heads*D) -> (B, T, heads, D)."""
    b, t, c = x.shape
    return x.reshape(b, t, heads, c // heads)


def merge_heads(x):
    """(B, T, heads, D) -> (B, T, heads*D)."""
    b, t, h, d = x.shape
    return x.reshape(b, t, h * d)


def multihead(x, context, heads, head_dim, *, names=("to_q", "to_k", "to_v", "to_out_0"),
              qkv_bias=False, zero_out=False, kv=None, kv_length=None, dtype, param_dtype):
    """q/k/v projections -> `attention` -> output projection, created in the calling module.

    `context` None means self-attention; `names` are the four Dense layers' parameter names.
    `kv`: the keys and values of the context already projected (`key_values`), which skips
    the k/v projections. `kv_length`: the context's true length when it is padded beyond it.
    """
    inner = heads * head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    q = dense(inner, use_bias=qkv_bias, name=names[0], **kw)(x)
    k, v = key_values(x if context is None else context, inner, names=names[1:3], qkv_bias=qkv_bias,
                      **kw) if kv is None else kv
    o = attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), scale=head_dim ** -0.5,
                  kv_length=kv_length)
    return dense(x.shape[-1], name=names[3], zero_init=zero_out, **kw)(merge_heads(o))


def key_values(ctx, inner, *, names=("to_k", "to_v"), qkv_bias=False, dtype, param_dtype):
    """The k and v projections of `ctx` (B, S, C) -> two (B, S, inner) arrays, created in the
    calling module."""
    kw = dict(use_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype)
    return tuple(dense(inner, name=n, **kw)(ctx) for n in names)
