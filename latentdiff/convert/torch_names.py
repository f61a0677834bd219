"""The rule that turns a PyTorch state dict with diffusers-style names into a Flax parameter tree.

Our modules use diffusers' names with list indices folded in (`down_blocks.0.resnets.1` ->
`down_blocks_0/resnets_1`), so one rule converts every model:
`weight` -> `kernel` (Linear transposed, Conv (O,I,kh,kw) -> (O,kh,kw,I), 1x1 convs and Linear
interchangeable), `scale` for norms, `embedding` for embeddings; everything is checked against the
model's own parameter shapes, and the first mismatch is named.
"""
import os

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model; the message names the first parameter that does not."""


def load_state_dict(path):
    """Read a `.safetensors`, `.bin`, `.pt`, `.pth` or `.ckpt` file into {name: float32 ndarray}.

    Safetensors need no torch; PyTorch pickles need the `torch` extra.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return {k: _to_f32(v) for k, v in load_file(path).items()}
        except Exception:  # bf16 tensors: numpy cannot hold them; go through flax's reader
            from safetensors.flax import load_file as load_flax

            return {k: np.asarray(v, np.float32) for k, v in load_flax(path).items()}
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading the PyTorch file {path} needs torch: pip install 'latentdiff[torch]'"
                          " (or convert it to .safetensors)") from e
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def _to_f32(v):
    return v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v


def flax_path(torch_key):
    """'down_blocks.0.attentions.1.to_out.0.weight' -> ('down_blocks_0', 'attentions_1', 'to_out_0', 'weight')."""
    out = []
    for part in torch_key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _fit(w, shape):
    """Reshape/transpose a torch tensor into a Flax kernel of `shape`, or None if impossible."""
    if len(shape) == 2:
        if w.ndim > 2 and all(s == 1 for s in w.shape[2:]):
            w = w.reshape(w.shape[:2])
        return w.T if w.ndim == 2 else None
    if len(shape) == 4:
        if w.ndim == 2:
            w = w[:, :, None, None]
        return w.transpose(0, 2, 3, 1) if w.ndim == 4 else None
    if len(shape) == 3:  # conv1d (O, I, K) -> (K, I, O)
        return w.transpose(2, 1, 0) if w.ndim == 3 else None
    return None


def convert_state_dict(state_dict, target, *, ignore=(), prefix=""):
    """Map {torch_name: array} onto the Flax tree `target` (arrays or ShapeDtypeStructs).

    Torch names matching any entry of `ignore` (a prefix) are skipped. Raises
    CheckpointMismatchError naming the first parameter that is missing, extra or mis-shaped.
    """
    flat_target = flatten_dict(target)
    out = {}
    where = f" ({prefix})" if prefix else ""
    for key in sorted(state_dict):
        if any(key.startswith(i) for i in ignore):
            continue
        w = np.asarray(state_dict[key])
        path = flax_path(key)
        leaf, parent = path[-1], path[:-1]
        if leaf == "weight" or leaf == "gamma":
            names = ("kernel", "scale", "embedding")
        elif leaf == "beta":
            names = ("bias",)
        else:
            names = (leaf,)
        dest = next((parent + (n,) for n in names if parent + (n,) in flat_target), None)
        if dest is None:
            raise CheckpointMismatchError(
                f"checkpoint parameter '{key}'{where} has no place in the model "
                f"(looked for {'/'.join(parent + (names[0],))})")
        shape = tuple(flat_target[dest].shape)
        value = _fit(w, shape) if dest[-1] == "kernel" and w.ndim != 1 else w
        if value is None or tuple(value.shape) != shape:
            raise CheckpointMismatchError(
                f"parameter '{'/'.join(dest)}'{where} does not fit: the model expects {shape}, "
                f"the checkpoint's '{key}' has {tuple(w.shape)}")
        out[dest] = np.asarray(value, dtype=getattr(flat_target[dest], "dtype", np.float32))
    missing = [k for k in flat_target if k not in out]
    if missing:
        raise CheckpointMismatchError(
            f"model parameter '{'/'.join(missing[0])}'{where} is missing from the checkpoint "
            f"({len(missing)} missing in all)")
    return unflatten_dict(out)
