"""taming-transformers' PatchGAN discriminator (`NLayerDiscriminator`) with PyTorch BatchNorm.

Parameters are named after taming's `main` Sequential (`main_0` conv, `main_3` BatchNorm, ...), so
a taming / CompVis checkpoint's `loss.discriminator.main.*` converts with
`discriminator_variables_from_torch`. BatchNorm keeps running statistics in the `batch_stats`
collection: call with `train=True, mutable=['batch_stats']` while training.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latentdiff.convert.torch_names import CheckpointMismatchError, convert_state_dict
from latentdiff.models.layers import Conv2D

Dtype = Any
_BN_BUFFERS = {"running_mean": "mean", "running_var": "var"}


def _normal(mean, std):
    def init(key, shape, dtype=jnp.float32):
        return mean + std * jax.random.normal(key, shape, dtype)

    return init


def _uniform(bound):
    """PyTorch's default conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (taming keeps it)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d semantics over NHWC: batch statistics (biased variance) in training,
    running estimates updated with `momentum` (torch convention, 0.1) and the UNBIASED variance;
    computed in float32. Statistics are over the whole (global) batch of the call."""

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train):
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", _normal(1.0, 0.02), (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axis=axes)
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            if not self.is_initializing():
                n = x32.size // c
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * jax.lax.stop_gradient(mean)
                ra_var.value = (1 - m) * ra_var.value + m * jax.lax.stop_gradient(
                    var * n / max(n - 1, 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: NHWC images in [-1, 1] -> (B, h, w, 1) logits (30x30 for 256 px, n_layers=3).

    Conv k4 s2 + LReLU(0.2); (n_layers-1) x [Conv k4 s2 (no bias) + BN + LReLU] with widths
    ndf*min(2^n, 8); Conv k4 s1 (no bias) + BN + LReLU; Conv k4 s1 -> 1. Every conv pads 1. Init as
    taming's `weights_init`: conv kernels N(0, 0.02), BN scale N(1, 0.02), BN bias 0.
    """

    ndf: int = 64
    n_layers: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train=True):
        idx = 0

        def conv4(x, features, stride, use_bias):
            nonlocal idx
            layer = Conv2D(features, 4, stride, 1, use_bias=use_bias, dtype=self.dtype,
                           param_dtype=self.param_dtype, kernel_init=_normal(0.0, 0.02),
                           bias_init=_uniform(1.0 / np.sqrt(16 * x.shape[-1])),
                           name=f"main_{idx}")
            idx += 1
            return layer(x)

        def bn_lrelu(x):
            nonlocal idx
            x = BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=f"main_{idx}")(
                x, train)
            idx += 2
            return nn.leaky_relu(x, 0.2)

        x = nn.leaky_relu(conv4(x.astype(self.dtype), self.ndf, 2, True), 0.2)
        idx += 1
        for n in range(1, self.n_layers):
            x = bn_lrelu(conv4(x, self.ndf * min(2 ** n, 8), 2, False))
        x = bn_lrelu(conv4(x, self.ndf * min(2 ** self.n_layers, 8), 1, False))
        return conv4(x, 1, 1, True).astype(jnp.float32)


def discriminator_variables_from_torch(state_dict, variables, prefix=""):
    """taming `NLayerDiscriminator` state dict (keys `main.N.*`, after `prefix`, e.g.
    'loss.discriminator.') -> {'params', 'batch_stats'} shaped like `variables` (arrays or
    ShapeDtypeStructs). Raises CheckpointMismatchError naming the first misfit."""
    sd = {k[len(prefix):]: np.asarray(v) for k, v in state_dict.items() if k.startswith(prefix)}
    params = convert_state_dict(
        {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] in ("weight", "bias")},
        variables["params"], prefix="discriminator")
    stats = {}
    for layer, target in variables["batch_stats"].items():
        stats[layer] = {}
        for torch_name, ours in _BN_BUFFERS.items():
            key = f"{layer.replace('_', '.')}.{torch_name}"
            if key not in sd or sd[key].shape != tuple(target[ours].shape):
                raise CheckpointMismatchError(
                    f"discriminator buffer '{prefix}{key}' is missing or mis-shaped (the model "
                    f"expects {tuple(target[ours].shape)})")
            stats[layer][ours] = sd[key].astype(np.float32)
    return {"params": params, "batch_stats": stats}
