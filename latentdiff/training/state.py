"""Train state (params, EMA, optimizer state, latent scale), the optimizer and the EMA rule."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    """Everything a step changes. `ema` shadows `params['unet']` (the paper EMAs the UNet only)."""

    step: jax.Array
    params: Any
    ema: Any
    opt_state: Any
    scale_factor: jax.Array


def learning_rate(optim, total_steps):
    """The config's schedule: 'constant' or 'cosine', after a linear warm-up from 0."""
    warm = int(optim.warmup_steps)
    if optim.schedule == "constant":
        after = optax.constant_schedule(optim.lr)
    elif optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(optim.lr, max(1, total_steps - warm))
    else:
        raise ValueError(f"unknown optim.schedule '{optim.schedule}': 'constant' or 'cosine'")
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warm), after], [warm])


PACK_MAX = 2 ** 16  # the largest float32 leaf `packed_small` packs


def _small(x, max_size):
    return x.dtype == jnp.float32 and x.size <= max_size


def _pack(tree, max_size):
    """(one float32 vector of the small leaves, the list of the other leaves), in tree order."""
    leaves = jax.tree_util.tree_leaves(tree)
    vec = [jnp.ravel(x) for x in leaves if _small(x, max_size)]
    return (jnp.concatenate(vec) if vec else jnp.zeros((0,), jnp.float32),
            [x for x in leaves if not _small(x, max_size)])


def packed_small(inner, max_size=PACK_MAX):
    """`inner` run on the float32 leaves of at most `max_size` elements joined into one vector (its
    state kept for that vector), and on the other leaves as they are.

    XLA gives every leaf of an optimizer update its own kernel, and a tiny leaf's costs about as
    much as a large one's: the txt2img UNet's ~400 biases and norm weights took 1.8 ms of its
    8.0 ms AdamW update on an H200. Packed, they are one kernel's work; the step went from
    0.1056-0.1096 to 0.1031-0.1038 s (same lease). For an elementwise optimizer (AdamW, Adam) the
    updates are the same as `inner`'s. (`optax.flatten` packs every leaf: a copy of all the weights,
    gradients and moments per step.)"""
    def unpack(packed, like):
        (vec, big), (leaves, treedef) = packed, jax.tree_util.tree_flatten(like)
        out, big, offset = [], iter(big), 0
        for x in leaves:
            if _small(x, max_size):
                out.append(vec[offset:offset + x.size].reshape(x.shape))
                offset += x.size
            else:
                out.append(next(big))
        return jax.tree_util.tree_unflatten(treedef, out)

    def update(updates, state, params=None):
        new, state = inner.update(_pack(updates, max_size), state, None if params is None else _pack(params, max_size))
        return unpack(new, updates), state

    return optax.GradientTransformation(lambda params: inner.init(_pack(params, max_size)), update)


def repack_state(opt_state, params, max_size=PACK_MAX):
    """An optimizer state in the layout from before `packed_small` (its moments shaped like
    `params`), in `packed_small`'s layout: every part that mirrors params is packed as params are.
    Checkpoints written before 2026-11-30 resume through it (`make_optimizer(..., pack=False)`
    describes their layout)."""
    treedef = jax.tree_util.tree_structure(params)

    def mirrors(x):
        return jax.tree_util.tree_structure(x) == treedef

    return jax.tree_util.tree_map(lambda x: _pack(x, max_size) if mirrors(x) else x, opt_state, is_leaf=mirrors)


def make_optimizer(optim, total_steps, pack=True):
    """AdamW (torch defaults as the paper: wd 0.01) with optional global-norm clipping; small
    weights updated together (`packed_small`). `pack=False`: without the packing, the optimizer
    state's layout of checkpoints written before it (see `repack_state`)."""
    tx = optax.adamw(learning_rate(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                     weight_decay=optim.weight_decay)
    if pack:
        tx = packed_small(tx)
    if optim.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
    return tx


def ema_update(ema, params, step, max_decay):
    """LitEma: after n updates (n = step + 1), decay = min(max_decay, (1 + n) / (10 + n))."""
    n = (step + 1).astype(jnp.float32)
    decay = jnp.minimum(max_decay, (1.0 + n) / (10.0 + n))
    return jax.tree_util.tree_map(lambda e, p: e - (1.0 - decay) * (e - p), ema, params)


def keep_if_finite(finite, new, old):
    """`new` where `finite`, else `old` with its step advanced: a NaN/inf step changes no weights."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old.replace(step=old.step + 1))
