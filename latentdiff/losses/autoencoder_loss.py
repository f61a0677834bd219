"""The autoencoder objectives of the paper, as pure functions for a jitted train step.

`LPIPSWithDiscriminator` (KL, `ldm/modules/losses/contperceptual.py`) and taming's
`VQLPIPSWithDiscriminator` (VQ) split into pieces:

* `reconstruction_loss`: |x - x_rec| + w_p * LPIPS, reduced as the paper does: a per-image SUM
  averaged over the batch for KL (with the fixed logvar 0), a plain mean for VQ.
* `gan_generator_loss`: g = -mean(D(x_rec)).
* `calculate_adaptive_weight(fn, last_layer, disc_weight)`: evaluates `fn(W) -> (nll, g)` ONCE and
  returns those values (differentiable with respect to anything `fn` closes over) together with
  d_weight = disc_weight * clip(||dnll/dW|| / (||dg/dW|| + 1e-4), 0, 1e4), stop-gradient, where W
  is the decoder's last conv kernel (`decoder/conv_out/kernel`, see `get_last_layer` /
  `replace_last_layer`). The two gradients only back-propagate from the losses to W.
* `kl_generator_loss` / `vq_generator_loss`: the totals and the paper's log entries.
* `discriminator_loss`: disc_factor * {hinge | vanilla}(D(x), D(x_rec)).

`step` may be a traced integer everywhere (`adopt_weight` uses `jnp.where`).

A KL generator step (disc_weight 0.5, disc_start 50001, kl_weight 1e-6 as the released configs)::

    def generator_loss_fn(ae_params, disc_vars, lpips_params, x, rng, step):
        def terms(kernel):
            x_rec, posterior = ae.apply({'params': replace_last_layer(ae_params, kernel)}, x,
                                        rng=rng)
            p_loss = lpips.apply({'params': lpips_params}, x, x_rec)
            nll, rec = reconstruction_loss(x, x_rec, p_loss, kind='kl')
            logits_fake, disc_state = disc.apply(disc_vars, x_rec, train=True,
                                                 mutable=['batch_stats'])
            return (nll, gan_generator_loss(logits_fake)), (posterior.kl(), rec, disc_state)

        (nll, g), d_weight, (kl, rec, disc_state) = calculate_adaptive_weight(
            terms, get_last_layer(ae_params), 0.5, has_aux=True)
        loss, log = kl_generator_loss(nll, g, kl, d_weight, step, disc_start=50001,
                                      kl_weight=1e-6, terms=rec)
        return loss, (log, disc_state['batch_stats'])

    grads, (log, disc_stats) = jax.grad(generator_loss_fn, has_aux=True)(ae_params, ...)

Only `ae_params` are differentiated; the discriminator's params are constants here but its BN
statistics are updated (torch keeps D in train mode during the generator step). The
discriminator step calls D separately on x and on stop_gradient(x_rec) (two calls, two sets of
batch statistics, as the paper) and feeds the logits to `discriminator_loss`.
"""
import jax
import jax.numpy as jnp

LAST_LAYER = ("decoder", "conv_out", "kernel")


# ----------------------------------------------------------------------------- pieces


def hinge_d_loss(logits_real, logits_fake):
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real))
                  + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake):
    """0.5 * (mean softplus(-D(x)) + mean softplus(D(x_rec)))."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adopt_weight(weight, step, threshold, value=0.0):
    """`value` while step < threshold, else `weight` (float32; `step` may be traced)."""
    return jnp.where(jnp.asarray(step) < threshold, value, weight).astype(jnp.float32)


def adaptive_weight(nll_grad_norm, g_grad_norm, disc_weight):
    """disc_weight * stop_gradient(clip(||grad nll|| / (||grad g|| + 1e-4), 0, 1e4))."""
    w = jnp.clip(nll_grad_norm / (g_grad_norm + 1e-4), 0.0, 1e4)
    return jax.lax.stop_gradient(w).astype(jnp.float32) * disc_weight


def _norm(x):
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))


def calculate_adaptive_weight(fn, last_layer, disc_weight, has_aux=False):
    """Run `fn(last_layer) -> (nll, g)` (or `((nll, g), aux)`) once.

    Returns `((nll, g), d_weight)` or `((nll, g), d_weight, aux)`; d_weight is computed from the
    gradients of nll and g with respect to `last_layer` (see `adaptive_weight`).
    """
    if has_aux:
        (nll, g), vjp, aux = jax.vjp(fn, last_layer, has_aux=True)
    else:
        (nll, g), vjp = jax.vjp(fn, last_layer)
    one, zero = jnp.ones_like(nll), jnp.zeros_like(nll)
    (nll_grad,) = vjp((one, zero))
    (g_grad,) = vjp((zero, one))
    d_weight = adaptive_weight(_norm(nll_grad), _norm(g_grad), disc_weight)
    return ((nll, g), d_weight, aux) if has_aux else ((nll, g), d_weight)


def get_last_layer(params, path=LAST_LAYER):
    """The decoder's last conv kernel (or the leaf at `path`) of an autoencoder param tree."""
    for key in path:
        params = params[key]
    return params


def replace_last_layer(params, value, path=LAST_LAYER):
    """A copy of the param tree (plain dicts along `path`) with the leaf at `path` replaced."""
    if not path:
        return value
    out = dict(params)
    out[path[0]] = replace_last_layer(params[path[0]], value, path[1:])
    return out


def reconstruction_loss(inputs, reconstructions, p_loss=None, *, kind, perceptual_weight=1.0,
                        logvar=0.0):
    """-> (nll_loss, {'rec_loss', 'p_loss'}), float32.

    rec = |x - x_rec| + perceptual_weight * p_loss (p_loss (B,1,1,1) or (B,), broadcast over the
    pixels). kind 'kl': nll = sum(rec / exp(logvar) + logvar) / B; kind 'vq': nll = mean(rec).
    """
    x = jnp.asarray(inputs, jnp.float32)
    rec = jnp.abs(x - jnp.asarray(reconstructions, jnp.float32))
    b = x.shape[0]
    if p_loss is not None and perceptual_weight > 0:
        p_loss = jnp.asarray(p_loss, jnp.float32).reshape((b,) + (1,) * (x.ndim - 1))
        rec = rec + perceptual_weight * p_loss
    else:
        p_loss = jnp.zeros((), jnp.float32)
    if kind == "kl":
        nll = jnp.sum(rec / jnp.exp(logvar) + logvar) / b
    elif kind == "vq":
        nll = jnp.mean(rec)
    else:
        raise ValueError(f"kind must be 'kl' or 'vq', got {kind!r}")
    return nll, {"rec_loss": jnp.mean(rec), "p_loss": jnp.mean(p_loss)}


def gan_generator_loss(logits_fake):
    """g = -mean(D(x_rec))."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


# ----------------------------------------------------------------------------- totals


def _adversarial(nll_loss, g_loss, d_weight, step, disc_start, disc_factor):
    factor = adopt_weight(disc_factor, step, disc_start)
    log = {"nll_loss": nll_loss, "g_loss": g_loss, "d_weight": jnp.asarray(d_weight, jnp.float32),
           "disc_factor": factor}
    return nll_loss + d_weight * factor * g_loss, log


def kl_generator_loss(nll_loss, g_loss, kl, d_weight, step, *, disc_start, kl_weight=1e-6,
                      disc_factor=1.0, logvar=0.0, terms=None):
    """nll + kl_weight * sum(kl)/B + d_weight * adopt_weight(disc_factor) * g -> (loss, log).

    `kl` is the per-image KL (B,) of the posterior. Pass d_weight=0 when disc_factor is 0 (the
    paper then skips the adaptive weight). `terms` (from `reconstruction_loss`) joins the log.
    """
    kl_loss = jnp.sum(kl.astype(jnp.float32)) / kl.shape[0]
    loss, log = _adversarial(nll_loss, g_loss, d_weight, step, disc_start, disc_factor)
    loss = loss + kl_weight * kl_loss
    log.update(total_loss=loss, kl_loss=kl_loss, logvar=jnp.asarray(logvar, jnp.float32))
    log.update({k: v for k, v in (terms or {}).items() if k == "rec_loss"})
    return loss, log


def vq_generator_loss(nll_loss, g_loss, codebook_loss, d_weight, step, *, disc_start,
                      codebook_weight=1.0, disc_factor=1.0, terms=None):
    """nll + d_weight * adopt_weight(disc_factor) * g + codebook_weight * codebook_loss."""
    quant = jnp.mean(jnp.asarray(codebook_loss, jnp.float32))
    loss, log = _adversarial(nll_loss, g_loss, d_weight, step, disc_start, disc_factor)
    loss = loss + codebook_weight * quant
    log.update(total_loss=loss, quant_loss=quant)
    log.update(terms or {})
    return loss, log


def discriminator_loss(logits_real, logits_fake, step, disc_start, disc_factor=1.0,
                       kind="hinge"):
    """adopt_weight(disc_factor) * {hinge|vanilla}_d_loss -> (d_loss, log)."""
    if kind not in D_LOSSES:
        raise ValueError(f"disc_loss must be one of {sorted(D_LOSSES)}, got {kind!r}")
    real, fake = logits_real.astype(jnp.float32), logits_fake.astype(jnp.float32)
    loss = adopt_weight(disc_factor, step, disc_start) * D_LOSSES[kind](real, fake)
    return loss, {"disc_loss": loss, "logits_real": jnp.mean(real),
                  "logits_fake": jnp.mean(fake)}
