"""Small building blocks shared by every model: norms, convs, resampling, timestep embedding.

Conventions: NHWC activations; every module takes `dtype` (compute) and `param_dtype` (storage).
Norms always compute in float32 and return the compute dtype. Parameter names follow diffusers so
that its checkpoints convert by rule (see `latentdiff.convert.torch_names`).
"""
import contextlib
import contextvars
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


_PARAM_GATHER = contextvars.ContextVar("latentdiff_param_gather", default=None)


@contextlib.contextmanager
def param_gather(fn):
    """While tracing in this context, every module made by `gathering` passes its parameters
    through fn where it runs (FSDP: cast to the compute dtype and gathered whole onto each device)."""
    token = _PARAM_GATHER.set(fn)
    try:
        yield
    finally:
        _PARAM_GATHER.reset(token)


def _gather(params):
    fn = _PARAM_GATHER.get()
    return params if fn is None else fn(params)


def gathering(cls, remat=False):
    """`cls` whose parameters go through the active `param_gather` function where the module runs;
    with `remat`, under activation checkpointing with the gather inside the checkpointed region, so
    that the backward pass gathers a block's weights again instead of keeping every block's
    gathered weights alive from the forward pass (ZeRO-3). Same parameters, names and values."""
    cls = nn.map_variables(cls, "params", trans_in_fn=_gather, init=True)
    return nn.remat(cls) if remat else cls


_FORWARD_MODE = contextvars.ContextVar("latentdiff_forward_mode", default=False)


@contextlib.contextmanager
def forward_mode():
    """Models traced in this context support forward-mode autodiff (`jax.jvp`, `jax.linearize`):
    the norms, GELU and GEGLU's gate run as plain functions instead of through their custom VJPs
    (`lean_vjp`), and attention takes XLA's path (cuDNN's defines no forward mode). Reverse mode
    works in it too, keeping whatever JAX's own rules keep for the backward pass. It acts where a
    model is traced: a function jitted and traced outside it keeps the custom VJPs in its cache."""
    token = _FORWARD_MODE.set(True)
    try:
        yield
    finally:
        _FORWARD_MODE.reset(token)


def in_forward_mode():
    """Whether a `forward_mode` context is active."""
    return _FORWARD_MODE.get()


def computed_by(fast, reference, *args):
    """reference(*args), computed by `fast`, another form of the same function, where nothing
    differentiates it; differentiated, by `reference` with its own VJP, so training programs keep
    `reference`; in `forward_mode`, `reference` as written. `fast` and `reference` take arrays only."""
    if _FORWARD_MODE.get():
        return reference(*args)
    by = jax.custom_vjp(lambda *a: fast(*a))  # (custom_vjp would pass `fast`'s defaults on to the rule)
    by.defvjp(lambda *a: jax.vjp(reference, *a), lambda pullback, g: pullback(g))
    return by(*args)


def lean_vjp(fwd, bwd, nondiff_argnums=()):
    """Decorator: the function with the VJP (`fwd`, `bwd`) that training uses, which keeps only what
    `fwd` saves (a bf16 input, per-group statistics) and recomputes the rest in the backward pass.
    A custom VJP has no forward mode, so in `forward_mode` the function runs as written instead."""
    def wrap(fn):
        lean = jax.custom_vjp(fn, nondiff_argnums=nondiff_argnums)
        lean.defvjp(fwd, bwd)

        @functools.wraps(fn)
        def dispatch(*args):
            return fn(*args) if _FORWARD_MODE.get() else lean(*args)
        return dispatch
    return wrap


def residual(x, y):
    """x + y (y cast to x's dtype) for a residual stream, written to memory where it is made when nothing
    differentiates it. Left to itself, XLA fuses the additions of a transformer block's stream into
    each reader instead: every LayerNorm and the block's last addition re-read all the earlier terms
    (four tensors at the end of a block). The barrier makes each sum one tensor, and leaves its
    addition to the kernel that makes y. Differentiated (training), a plain addition (`computed_by`)."""
    return computed_by(lambda a, b: jax.lax.optimization_barrier(a + b), jnp.add, x, y.astype(x.dtype))


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _gelu_parts(x32):
    """Phi(x) and phi(x), the normal CDF and density: GELU = x Phi(x), GELU' = Phi(x) + x phi(x)."""
    return 0.5 * (1.0 + jax.lax.erf(x32 * _SQRT_HALF)), jnp.exp(-0.5 * jnp.square(x32)) * _INV_SQRT_2PI


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    x32 = x.astype(jnp.float32)
    cdf, pdf = _gelu_parts(x32)
    return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


@lean_vjp(_gelu_fwd, _gelu_bwd)
def gelu(x):
    """Exact GELU as torch computes it, 0.5 x (1 + erf(x / sqrt 2)), in float32, cast back.

    jax.nn.gelu(approximate=False) goes through erfc, whose two branches XLA evaluates for every
    element: the UNet's GEGLU took 2-3x the time of its memory traffic (sampling 3% slower). The
    gradient is recomputed from x alone, so training keeps no float32 intermediates for it.
    """
    x32 = x.astype(jnp.float32)
    return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * _SQRT_HALF))).astype(x.dtype)


def _geglu_fwd(h):
    return geglu(h), h


def _geglu_bwd(h, g):
    value, gate = (v.astype(jnp.float32) for v in jnp.split(h, 2, axis=-1))
    g32 = g.astype(jnp.float32)
    cdf, pdf = _gelu_parts(gate)
    return (jnp.concatenate([g32 * gate * cdf, g32 * value * (cdf + gate * pdf)], axis=-1).astype(h.dtype),)


@lean_vjp(_geglu_fwd, _geglu_bwd)
def geglu(h):
    """GEGLU's gate: value * gelu(gate) for h = [value | gate] (last axis). Training keeps h alone
    (not the halves or gelu(gate) besides it) and recomputes the rest in the backward pass."""
    value, gate = jnp.split(h, 2, axis=-1)
    return value * gelu(gate)


def _group_stats(x32, shift, groups, eps):
    """Per (batch, group) mean and 1/std of x + shift, x (b, n, c) and shift (b, c) or None, from
    per-channel sums over space (the shift enters the sums, not x)."""
    b, n, c = x32.shape
    count = n * (c // groups)
    s1, s2 = jnp.sum(x32, axis=1), jnp.sum(jnp.square(x32), axis=1)
    if shift is not None:
        s1, s2 = s1 + n * shift, s2 + shift * (2.0 * s1 + n * shift)
    s1, s2 = (s.reshape(b, groups, c // groups).sum(-1) for s in (s1, s2))
    mean = s1 / count
    var = jnp.maximum(s2 / count - jnp.square(mean), 0.0)
    return mean, jax.lax.rsqrt(var + eps)


def _per_channel(v, c):
    """(b, groups) -> (b, 1, c): each group's value for its channels."""
    return jnp.repeat(v, c // v.shape[1], axis=1)[:, None, :]


def _shift32(shift, x):
    """The optional per-(batch, channel) shift as float32 (b, c)."""
    return None if shift is None else shift.astype(jnp.float32).reshape(x.shape[0], x.shape[-1])


def _group_norm_core(x, shift, scale, bias, groups, eps, silu, dtype):
    x32 = x.astype(jnp.float32).reshape(x.shape[0], -1, x.shape[-1])
    t = _shift32(shift, x)
    mean, rstd = _group_stats(x32, t, groups, eps)
    c = x.shape[-1]
    a = _per_channel(rstd, c) * scale
    offset = bias - _per_channel(mean, c) * a
    if t is not None:
        offset = offset + t[:, None, :] * a
    z = x32 * a + offset
    y = z * jax.nn.sigmoid(z) if silu else z
    return y.reshape(x.shape).astype(dtype), (mean, rstd)


def _group_norm_fwd(x, shift, scale, bias, groups, eps, silu, dtype):
    y, (mean, rstd) = _group_norm_core(x, shift, scale, bias, groups, eps, silu, dtype)
    return y, (x, shift, scale, bias, mean, rstd)


def _group_norm_bwd(groups, eps, silu, dtype, res, g):
    x, shift, scale, bias, mean, rstd = res
    b, c = x.shape[0], x.shape[-1]
    x32 = x.astype(jnp.float32).reshape(b, -1, c)
    t = _shift32(shift, x)
    if t is not None:
        x32 = x32 + t[:, None, :]
    xhat = (x32 - _per_channel(mean, c)) * _per_channel(rstd, c)
    gz = g.astype(jnp.float32).reshape(b, -1, c)
    if silu:
        z = xhat * scale + bias
        s = jax.nn.sigmoid(z)
        gz = gz * (s * (1.0 + z * (1.0 - s)))
    sum_g, sum_gx = jnp.sum(gz, axis=1), jnp.sum(gz * xhat, axis=1)  # (b, c) each
    count = x32.shape[1] * (c // groups)
    m1 = (sum_g * scale).reshape(b, groups, -1).sum(-1) / count  # mean of dL/dxhat per group
    m2 = (sum_gx * scale).reshape(b, groups, -1).sum(-1) / count  # mean of dL/dxhat * xhat
    dx = _per_channel(rstd, c) * (gz * scale - _per_channel(m1, c) - xhat * _per_channel(m2, c))
    dshift = None if t is None else jnp.sum(dx, axis=1).reshape(shift.shape).astype(shift.dtype)
    return dx.reshape(x.shape).astype(x.dtype), dshift, jnp.sum(sum_gx, axis=0), jnp.sum(sum_g, axis=0)


@lean_vjp(_group_norm_fwd, _group_norm_bwd, nondiff_argnums=(4, 5, 6, 7))
def group_norm(x, shift, scale, bias, groups, eps, silu, dtype):
    """GroupNorm of x + shift (x (b, ..., c); shift (b, c), broadcast over space, or None) in
    float32 with float32 `scale`, `bias` (c,), then SiLU if `silu`, returned in `dtype`. The
    statistics are per-channel sums over space (one read of x, no transpose of the grouped axes),
    pooled per group; the normalisation is one per-channel scale and shift that XLA fuses with what
    follows. The shift (a ResBlock's timestep embedding) enters the sums and the normalisation's
    offset, so x + shift is never written out: as an addition, XLA fused it into the convolution
    before as cuDNN's side input, which took the shift broadcast to x's full size. The gradient is
    recomputed from x and the per-group statistics, so training keeps x (in its own dtype) and
    nothing in float32."""
    return _group_norm_core(x, shift, scale, bias, groups, eps, silu, dtype)[0]


def _norm_params(module, channels):
    """A norm's `scale` (ones) and `bias` (zeros), shape (channels,), in float32."""
    make = lambda name, init: module.param(name, init, (channels,), module.param_dtype).astype(jnp.float32)  # noqa: E731
    return make("scale", nn.initializers.ones), make("bias", nn.initializers.zeros)


class GroupNorm(nn.Module):
    """GroupNorm (params `scale`, `bias`), then SiLU if `silu`: `group_norm` in a module."""

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    silu: bool = False

    @nn.compact
    def __call__(self, x, shift=None):
        """GroupNorm of x + shift; `shift` (b, c) or None (see `group_norm`)."""
        scale, bias = _norm_params(self, x.shape[-1])
        return group_norm(x, shift, scale, bias, self.num_groups, self.epsilon, self.silu, self.dtype)


def _layer_norm_core(x, scale, bias, eps, dtype):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True) + eps)
    return ((x32 - mean) * rstd * scale + bias).astype(dtype), (mean, rstd)


def _layer_norm_fwd(x, scale, bias, eps, dtype):
    y, (mean, rstd) = _layer_norm_core(x, scale, bias, eps, dtype)
    return y, (x, scale, mean, rstd)


def _layer_norm_bwd(eps, dtype, res, g):
    x, scale, mean, rstd = res
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g32 = g.astype(jnp.float32)
    gx = g32 * scale
    dx = rstd * (gx - jnp.mean(gx, axis=-1, keepdims=True) - xhat * jnp.mean(gx * xhat, axis=-1, keepdims=True))
    lead = tuple(range(x.ndim - 1))
    return dx.astype(x.dtype), jnp.sum(g32 * xhat, axis=lead), jnp.sum(g32, axis=lead)


@lean_vjp(_layer_norm_fwd, _layer_norm_bwd, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, eps, dtype):
    """LayerNorm over the last axis in float32, returned in `dtype`; like `group_norm`, its
    gradient is recomputed from x and the per-row statistics (no float32 residuals)."""
    return _layer_norm_core(x, scale, bias, eps, dtype)[0]


class LayerNorm(nn.Module):
    """LayerNorm over the last axis (torch's default eps 1e-5): `layer_norm` in a module."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale, bias = _norm_params(self, x.shape[-1])
        return layer_norm(x, scale, bias, self.epsilon, self.dtype)


def cast_in_backward(op, x, kernel, dtype):
    """op(x, kernel) computed in `dtype`. When the kernel is stored wider (float32 master weights,
    bf16 compute), its cast runs inside a checkpoint: the backward pass casts the stored kernel again
    instead of keeping a bf16 copy of every weight alive from the forward pass to the backward
    (1.6 GiB for the 872M UNet). Only the cast is recomputed: the op's output is not needed by its
    gradient, so it is not run again. x is cast outside, so that the backward keeps x in `dtype`."""
    x = x.astype(dtype)
    if kernel.dtype == dtype:
        return op(x, kernel)
    return jax.checkpoint(lambda a, k: op(a, k.astype(dtype)))(x, kernel)


PREPARED = "prepared"  # variable collection: what layers derive from their parameters alone


def computed_once(module, collection, name, compute):
    """`module`'s variable `name` of `collection` where the variables hold it (a sampling loop's cache:
    `unet.context_key_values`, `unet.time_projections`, `unet.prepared_weights`); else compute(),
    stored there when the collection is mutable (not in `init`)."""
    if module.has_variable(collection, name):
        return module.get_variable(collection, name)
    value = compute()
    if module.is_mutable_collection(collection) and not module.is_initializing():
        module.put_variable(collection, name, value)
    return value


class Conv2D(nn.Module):
    """A 2-D convolution of NHWC inputs whose kernel is stored (out, kh, kw, in).

    That is cuDNN's own filter layout for NHWC (KRSC): the forward and backward convolutions read
    the kernel and write its gradient as stored, so no step transposes weights or gradients (with
    flax's (kh, kw, in, out) kernels the optimizer update and the bf16 casts transposed every conv
    kernel, 19 ms of a 156 ms txt2img training step on an H100). `padding` is an int (symmetric)
    or "VALID". `upsample`: the input is first upsampled x2 by nearest neighbour (a 3x3 kernel,
    padding 1, stride 1), computed without upsampling it (`upsample_conv`).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: Any = 1
    use_bias: bool = True
    upsample: bool = False
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal(in_axis=-1, out_axis=0)
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (self.features, k, k, x.shape[-1]),
                            self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, self.param_dtype)
        pad = self.padding if isinstance(self.padding, str) else [(self.padding, self.padding)] * 2
        if self.upsample:
            if (k, self.stride, self.padding) != (3, 1, 1):
                raise ValueError("Conv2D(upsample=True) is a 3x3 convolution of stride 1 and padding 1")
            if self.has_variable(PREPARED, "phases") or self.is_mutable_collection(PREPARED):
                # a sampling loop's: the phases' kernels folded once, before it (`unet.prepared_weights`)
                phases = computed_once(self, PREPARED, "phases", lambda: upsample_phases(kernel.astype(dtype)))
                y = upsample_conv(x.astype(dtype), phases)
            else:
                y = cast_in_backward(lambda a, w: upsample_conv(a, upsample_phases(w)), x, kernel, dtype)
        else:
            y = cast_in_backward(lambda a, w: jax.lax.conv_general_dilated(
                a, w, (self.stride, self.stride), pad, dimension_numbers=("NHWC", "OHWI", "NHWC")), x, kernel, dtype)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        return y


def conv(features, kernel=3, stride=1, padding=1, *, dtype, param_dtype, name, zero_init=False,
         use_bias=True, gather=False, upsample=False):
    """A `Conv2D` with explicit symmetric padding (never 'SAME', which differs for stride 2);
    `gather`: made by `gathering` (a layer outside the model's blocks); `upsample`: of the input
    upsampled x2 (nearest)."""
    kwargs = dict(kernel_init=nn.initializers.zeros) if zero_init else {}
    cls = gathering(Conv2D) if gather else Conv2D
    return cls(features, kernel, stride, padding, use_bias=use_bias, upsample=upsample, dtype=dtype,
               param_dtype=param_dtype, name=name, **kwargs)


def _fold_taps(k, axis):
    """A 3-tap axis of a kernel folded for nearest x2 upsampling: (..., 3, ...) -> (2, ..., 2, ...),
    phase first. An output at even position 2p sees rows p-1 (tap 0) and p (taps 1 and 2) of the
    input before upsampling; at odd 2p+1, rows p (taps 0 and 1) and p+1 (tap 2)."""
    t0, t1, t2 = (jax.lax.index_in_dim(k, i, axis, keepdims=False) for i in range(3))
    return jnp.stack([jnp.stack([t0, t1 + t2], axis), jnp.stack([t0 + t1, t2], axis)])


def upsample_phases(kernel):
    """A 3x3 kernel (out, 3, 3, c) of a convolution after nearest x2 upsampling, as its four output
    phases' 2x2 kernels (2 a, 2 b, out, 2 r, 2 s, c) in the kernel's dtype: the taps that land on the
    same input pixel summed in float32 (`upsample_conv`)."""
    return _fold_taps(_fold_taps(kernel.astype(jnp.float32), 2), 2).astype(kernel.dtype)


def upsample_conv(x, phases):
    """conv3x3(upsample_nearest(x, 2)) with padding 1, x (b, h, w, c), its kernel given as its
    `upsample_phases`: four 2x2 convolutions of x, one per output phase (sub-pixel), 16 instead of
    36 multiply-adds per input pixel and channel pair, and the 4x larger upsampled input is never
    written. Each phase's convolution is padded to read exactly its own window, so neither pass
    computes outputs that are thrown away (one convolution of 4 * out channels over x padded by 1,
    sliced per phase, had a backward 2-5x slower on the autoencoder's large maps; BENCHMARKS.md,
    session 17). The phases depend on the weights alone: a sampling loop folds them once
    (`Conv2D`, the `prepared` collection), not on every step (XLA keeps them in the loop)."""
    b, h, w, _ = x.shape
    out = phases.shape[2]
    rows = [jnp.stack([jax.lax.conv_general_dilated(x, phases[a, c], (1, 1), [(1 - a, a), (1 - c, c)],
                                                    dimension_numbers=("NHWC", "OHWI", "NHWC"))
                       for c in (0, 1)], axis=3) for a in (0, 1)]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, out)  # (b, h, 2 a, w, 2 b, out)


def dense_apply(x, kernel, bias, dtype):
    """x @ kernel (+ bias) over the last axis in `dtype`, the kernel's cast recomputed in the backward
    pass (`cast_in_backward`)."""
    y = cast_in_backward(lambda a, w: jax.lax.dot_general(a, w, (((a.ndim - 1,), (0,)), ((), ()))),
                         x, kernel, dtype)
    return y if bias is None else y + bias.astype(dtype)


class Dense(nn.Module):
    """x @ kernel (+ bias) over the last axis, kernel stored (in, out) as flax's nn.Dense, its
    compute-dtype cast recomputed in the backward pass (`cast_in_backward`). `product`: the function
    of (x, kernel, bias, dtype) that computes it, `dense_apply`, or one that also computes what follows
    (GEGLU's gate: `geglu_gemm.gated_projection`)."""

    features: int
    use_bias: bool = True
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros
    product: Callable = dense_apply

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        return self.product(x, kernel, bias, self.dtype or jnp.result_type(x, self.param_dtype))


def dense(features, *, dtype, param_dtype, name, use_bias=True, zero_init=False):
    """A `Dense` layer (kernel stored (in, out))."""
    kwargs = dict(kernel_init=nn.initializers.zeros) if zero_init else {}
    return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name, **kwargs)


def upsample_nearest(x, factor=2):
    """Nearest-neighbour upsampling of an NHWC tensor by an integer factor."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
    return x.reshape(b, h * factor, w * factor, c)


def avg_pool2(x):
    """2x2 average pooling with stride 2 (NHWC)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (B,) -> (B, dim).

    `flip_sin_to_cos=True, freq_shift=0` is the paper's openaimodel embedding (cos first);
    diffusers' `downscale_freq_shift` is `freq_shift`.
    """
    half = dim // 2
    exponent = -jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb
