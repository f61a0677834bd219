"""Prediction types and the training loss.

A model predicts one of 'eps' (the noise), 'x0' (the clean sample) or 'v' (sqrt(a) eps - sqrt(1-a) x0,
Salimans & Ho 2022), where x_t = sqrt(a) x0 + sqrt(1-a) eps and a = alpha_bar_t. diffusers' names
('epsilon', 'sample', 'v_prediction') are accepted too. `alpha_bar` may be a scalar or a (B,) array.
"""
import jax.numpy as jnp

PREDICTION_TYPES = {"eps": "eps", "epsilon": "eps", "x0": "x0", "sample": "x0", "v": "v", "v_prediction": "v"}


def canonical_prediction_type(prediction_type):
    """'eps' | 'x0' | 'v' from ours or diffusers' name."""
    try:
        return PREDICTION_TYPES[prediction_type]
    except KeyError:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of "
                         f"{sorted(PREDICTION_TYPES)}") from None


def _coefs(alpha_bar, x):
    a = jnp.asarray(alpha_bar, x.dtype)
    a = a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a
    return jnp.sqrt(a), jnp.sqrt(1 - a)


def to_eps(out, x_t, alpha_bar, prediction_type="eps"):
    """The noise implied by model output `out` at x_t."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "eps":
        return out
    sa, s1a = _coefs(alpha_bar, x_t)
    if kind == "x0":
        return (x_t - sa * out) / s1a
    return sa * out + s1a * x_t


def to_x0(out, x_t, alpha_bar, prediction_type="eps"):
    """The clean sample implied by model output `out` at x_t (not clipped)."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "x0":
        return out
    sa, s1a = _coefs(alpha_bar, x_t)
    if kind == "eps":
        return (x_t - s1a * out) / sa
    return sa * x_t - s1a * out


def training_target(x0, noise, alpha_bar, prediction_type="eps"):
    """What the model should output for x_t = q_sample(x0, t, noise)."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "eps":
        return noise
    if kind == "x0":
        return x0
    sa, s1a = _coefs(alpha_bar, x0)
    return sa * noise - s1a * x0


def diffusion_loss(pred, target, kind="l2"):
    """Per-example loss, mean over all non-batch axes (the paper's `loss_simple`): shape (B,)."""
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    if kind == "l2":
        d = jnp.square(d)
    elif kind == "l1":
        d = jnp.abs(d)
    else:
        raise ValueError(f"unknown loss kind {kind!r}; expected 'l2' or 'l1'")
    return jnp.mean(d, axis=tuple(range(1, d.ndim)))
