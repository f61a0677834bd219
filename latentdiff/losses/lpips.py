"""LPIPS perceptual distance (taming-transformers' VGG16 variant), frozen and never downloaded.

`LPIPS()(x0, x1)` takes NHWC images in [-1, 1] and returns the distance per image, (B,1,1,1).
Parameters (`features_N` for torchvision's `vgg16().features[N]` convs, `lin_0..lin_4` for the
learned 1x1 heads) come from one file made once by `python -m latentdiff.convert.lpips_weights`;
`load_lpips_params(path)` reads it.
"""
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latentdiff.convert.torch_names import convert_state_dict, load_state_dict
from latentdiff.models.layers import conv

Dtype = Any

# Output channels of VGG16's 13 convs, grouped by block; each block ends at an LPIPS tap
# (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), and a 2x2 max-pool separates the blocks.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10

WEIGHTS_HELP = (
    "LPIPS needs one converted weights file, made once from two downloads:\n"
    "  1. torchvision's VGG16 ImageNet weights, vgg16-397923af.pth\n"
    "     (torchvision.models.vgg16(weights='IMAGENET1K_V1'), i.e.\n"
    "     https://download.pytorch.org/models/vgg16-397923af.pth);\n"
    "  2. the LPIPS linear heads, vgg.pth (MD5 d507d7349b931f0638a25a48a722f98a), shipped\n"
    "     with the `lpips` package as lpips/weights/v0.1/vgg.pth and fetched by\n"
    "     taming-transformers into taming/modules/autoencoder/lpips/vgg.pth.\n"
    "Then run:\n"
    "  python -m latentdiff.convert.lpips_weights --vgg vgg16-397923af.pth --lin vgg.pth "
    "--out lpips_vgg16.safetensors")


def vgg16_conv_indices():
    """Indices N of the convs in torchvision's `vgg16().features`, one tuple per block."""
    out, n = [], 0
    for block in VGG16_BLOCKS:
        out.append(tuple(range(n, n + 2 * len(block), 2)))  # conv, ReLU, conv, ReLU, ...
        n += 2 * len(block) + 1  # ... then the max-pool
    return tuple(out)


def _unit_normalize(f):
    """f / (||f||_channels + eps), with a finite gradient where the whole feature vector is 0."""
    s = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    norm = jnp.where(s > 0, jnp.sqrt(jnp.where(s > 0, s, 1.0)), 0.0)
    return f / (norm + EPS)


class LPIPS(nn.Module):
    """d(x0, x1) = sum_taps mean_hw lin(||unit(f(x0)) - unit(f(x1))||^2), NHWC inputs in [-1, 1].

    VGG convs compute in `dtype`; the normalisation, heads and averages in float32. Both images go
    through VGG in one batch. Returns (B,1,1,1) (broadcasts over NHWC images), or (B,) with
    `keepdims=False`.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x0, x1, keepdims=True):
        b = x0.shape[0]
        x = jnp.concatenate([x0, x1]).astype(jnp.float32)
        x = ((x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)).astype(self.dtype)
        total = jnp.zeros((b,), jnp.float32)
        for i, (widths, indices) in enumerate(zip(VGG16_BLOCKS, vgg16_conv_indices())):
            if i:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            for width, n in zip(widths, indices):
                x = nn.relu(conv(width, 3, 1, 1, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name=f"features_{n}")(x))
            f0, f1 = jnp.split(x.astype(jnp.float32), 2)
            diff = jnp.square(_unit_normalize(f0) - _unit_normalize(f1))
            head = conv(1, 1, 1, 0, use_bias=False, dtype=jnp.float32,
                        param_dtype=self.param_dtype, name=f"lin_{i}")
            total = total + jnp.mean(head(diff), axis=(1, 2, 3))
        return total.reshape(b, 1, 1, 1) if keepdims else total


def lpips_abstract_params(model=None):
    """The parameter tree of `model` (default LPIPS()) as ShapeDtypeStructs."""
    model = model or LPIPS()
    x = jnp.zeros((1, 16, 16, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, x))["params"]


def lpips_params_from_state_dict(state_dict, model=None):
    """{`features.N.weight|bias`, `lin.I.weight`} (PyTorch layout) -> LPIPS Flax params.

    Raises CheckpointMismatchError naming the first parameter that is missing or mis-shaped.
    """
    return convert_state_dict(state_dict, lpips_abstract_params(model), prefix="LPIPS")


def load_lpips_params(path, model=None):
    """Read the converted LPIPS file (see WEIGHTS_HELP) into Flax params (float32 numpy arrays)."""
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(f"LPIPS weights file not found: {path!r}.\n{WEIGHTS_HELP}")
    params = lpips_params_from_state_dict(load_state_dict(path), model)
    return jax.tree_util.tree_map(np.asarray, params)
