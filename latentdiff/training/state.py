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


def make_optimizer(optim, total_steps):
    """AdamW (torch defaults as the paper: wd 0.01) with optional global-norm clipping."""
    tx = optax.adamw(learning_rate(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                     weight_decay=optim.weight_decay)
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
