"""Small conditioning encoders: class labels and spatial maps (CompVis' encoders/modules.py).

`ClassEmbedder` gives a one-token cross-attention context; `SpatialRescaler` resizes a map (e.g. a
one-hot segmentation) to the latent size, as `torch.nn.functional.interpolate(x, scale_factor=m)` does
(align_corners=False), then optionally mixes channels with a bias-free 1x1 conv.
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from latentdiff.models.layers import conv

Dtype = Any


class ClassEmbedder(nn.Module):
    """Labels (B,) int -> context (B, 1, embed_dim); param `embedding/embedding` (CompVis'
    `embedding.weight`)."""

    n_classes: int
    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels):
        emb = nn.Embed(self.n_classes, self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="embedding")
        return emb(jnp.asarray(labels)[:, None])


def _taps(n_in, scale, method):
    """Source indices and weights (n_out, taps) of torch's 1-D resize by `scale` (no align_corners)."""
    n_out = int(math.floor(n_in * scale))
    if n_out < 1:
        raise ValueError(f"resizing {n_in} pixels by {scale} leaves none")
    inv = np.float32(1.0 / scale)  # torch computes coordinates in float32 from 1/scale_factor
    dst = np.arange(n_out, dtype=np.float32)
    if method == "nearest":
        idx = np.minimum(np.floor(dst * inv).astype(np.int64), n_in - 1)
        return idx[:, None], np.ones((n_out, 1), np.float32)
    if method == "area":  # adaptive average pooling to n_out
        start = (np.arange(n_out) * n_in) // n_out
        end = ((np.arange(n_out) + 1) * n_in + n_out - 1) // n_out
        k = int((end - start).max())
        idx = np.minimum(start[:, None] + np.arange(k), n_in - 1)
        w = (start[:, None] + np.arange(k) < end[:, None]) / (end - start)[:, None]
        return idx, w.astype(np.float32)
    src = inv * (dst + np.float32(0.5)) - np.float32(0.5)
    if method == "bilinear":
        src = np.maximum(src, 0)
        i0 = np.minimum(src.astype(np.int64), n_in - 1)
        t = np.clip(src - i0, 0, 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return np.stack([i0, i1], 1), np.stack([1 - t, t], 1).astype(np.float32)
    if method == "bicubic":  # Keys cubic, a = -0.75, clamped borders
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        t = np.clip(src - i0, 0, 1).astype(np.float32)
        a = np.float32(-0.75)
        near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731
        far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731
        w = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], 1)
        idx = np.clip(i0[:, None] + np.arange(-1, 3), 0, n_in - 1)
        return idx, w.astype(np.float32)
    raise ValueError(f"unknown interpolation method {method!r}: "
                     "use 'nearest', 'bilinear', 'bicubic' or 'area'")


def resize(x, scale, method="bilinear"):
    """Resize an NHWC array by `scale` on H and W like torch's F.interpolate(scale_factor=scale),
    computed in float32."""
    x = x.astype(jnp.float32)
    for axis in (1, 2):
        idx, w = _taps(x.shape[axis], scale, method)
        shape = [1] * x.ndim
        shape[axis] = len(idx)
        x = sum(jnp.take(x, idx[:, k], axis=axis) * w[:, k].reshape(shape) for k in range(idx.shape[1]))
    return x


class SpatialRescaler(nn.Module):
    """NHWC map -> resized `n_stages` times by `multiplier`, then a bias-free 1x1 conv `channel_mapper`
    to `out_channels` (if set)."""

    n_stages: int = 1
    method: str = "bilinear"
    multiplier: float = 0.5
    in_channels: int = 3
    out_channels: Optional[int] = None
    bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"SpatialRescaler expects {self.in_channels} channels (NHWC), "
                             f"got shape {x.shape}")
        for _ in range(self.n_stages):
            x = resize(x, self.multiplier, self.method)
        x = x.astype(self.dtype)
        if self.out_channels is not None:
            x = conv(self.out_channels, kernel=1, padding=0, use_bias=self.bias, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="channel_mapper")(x)
        return x
