"""Helpers for parity tests against diffusers' PyTorch modules (CPU, float32)."""
import importlib
import os
import sys

import jax
import numpy as np

from latentdiff.convert.torch_names import convert_state_dict


def peer_models():
    """`benchmarks/peer_models.py`: the PyTorch peers of our models, which are also the references of
    the LPIPS and discriminator parity tests (imported as bench.py imports it, from its folder)."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("peer_models")


def state_dict_numpy(torch_module):
    """A torch module's state dict as {name: float32 ndarray}."""
    return {k: v.detach().float().numpy() for k, v in torch_module.state_dict().items()}


def flax_params_from_torch(torch_module, flax_module, *init_args, ignore=(), **init_kwargs):
    """Convert `torch_module`'s weights into the parameter tree of `flax_module`."""
    shapes = jax.eval_shape(lambda: flax_module.init(jax.random.key(0), *init_args, **init_kwargs))
    return convert_state_dict(state_dict_numpy(torch_module), shapes["params"], ignore=ignore)


def nchw(x):
    """NHWC numpy -> NCHW torch tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    """NCHW torch tensor -> NHWC numpy."""
    return t.detach().float().numpy().transpose(0, 2, 3, 1)


def rel_err(a, b):
    """Max-abs relative error ||a-b||_inf / ||b||_inf."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
