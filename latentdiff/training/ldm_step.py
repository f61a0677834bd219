"""The LDM train step: a pure function of (state, frozen params, batch), jitted once by the loop.

Latents come from the frozen first stage (KL: a posterior sample; VQ: pre-quantisation), scaled by
`state.scale_factor`; conditioning is computed inside the step so a trainable encoder gets
gradients; classifier-free-guidance dropout replaces it by the null input with probability p.
A non-finite loss leaves the state untouched and is reported in the metrics.
"""
import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from latentdiff.data.transforms import low_resolution
from latentdiff.diffusion.objectives import diffusion_loss, training_target
from latentdiff.models.autoencoder import DiagonalGaussian, VQModel, first_stage_latents
from latentdiff.models.layers import param_gather
from latentdiff.training.state import TrainState, ema_update, keep_if_finite


@dataclasses.dataclass(frozen=True)
class LDMTask:
    """What the step needs besides parameters (hashable, closed over by jit)."""

    unet: Any
    vae: Any
    cond_model: Any
    task: str
    alphas_cumprod: Any  # numpy float64 (T,)
    parameterization: str = "eps"
    loss_type: str = "l2"
    cond_trainable: bool = True
    cond_drop_prob: float = 0.0
    null_class: Optional[int] = None
    null_tokens: Any = None  # (L,) ids of the empty prompt, for text dropout
    ema_max_decay: float = 0.9999
    use_ema: bool = True
    # FSDP: the sharding (replicated over the mesh) that the trainable parameters are gathered to, in
    # the UNet's compute dtype, layer by layer where each runs (inside checkpointed blocks, so the
    # backward pass gathers them again). Every layer then runs as under data parallelism (whole
    # weights, activations split by batch) and the gradients are reduce-scattered back to the
    # parameters' shards. None: use the parameters where they are.
    gather: Any = None

    def __hash__(self):
        return id(self)


def first_stage_moments(task, vae_params, images):
    """What the latent cache stores: KL posterior moments (mean ‖ logvar) or VQ pre-quant latents."""
    out = task.vae.apply({"params": vae_params}, images, method="encode")
    if isinstance(task.vae, VQModel):
        return out.astype(jnp.float32)
    return jnp.concatenate([out.mean, out.logvar], axis=-1)


def batch_latents(task, vae_params, batch, rng):
    """Unscaled latents of a batch: from cached moments (sampled anew each time) or from images."""
    if "moments" not in batch:
        return encode_latents(task, vae_params, batch["image"], rng)
    if isinstance(task.vae, VQModel):
        return batch["moments"]
    return DiagonalGaussian.from_moments(batch["moments"]).sample(rng)


def encode_latents(task, vae_params, images, rng):
    """First-stage latents of [-1, 1] images (unscaled; KL posteriors are sampled)."""
    return first_stage_latents(task.vae, vae_params, images, rng)


def _dropped(rng, batch, p):
    return jax.random.uniform(rng, (batch,)) < p


def conditioning(task, cond_params, vae_params, batch, rng, train=True):
    """-> (context for cross-attention or None, channels to concatenate or None)."""
    b = jax.tree_util.tree_leaves(batch)[0].shape[0]
    k_drop, k_mask, k_enc = jax.random.split(rng, 3)
    p = task.cond_drop_prob if train else 0.0
    if task.task == "class2img":
        labels = batch["class_label"].astype(jnp.int32)
        if p > 0:
            labels = jnp.where(_dropped(k_drop, b, p), task.null_class, labels)
        return task.cond_model.apply({"params": cond_params}, labels), None
    if task.task == "text2img" and "context" in batch:  # precomputed by a frozen text encoder
        if p > 0:
            raise ValueError("caption dropout needs tokens, not a precomputed context: set "
                             "model.cond_drop_prob=0 or give the batch 'tokens'")
        return batch["context"], None
    if task.task == "text2img":
        tokens = batch["tokens"].astype(jnp.int32)
        if p > 0:
            null = jnp.asarray(task.null_tokens, jnp.int32)[None]
            tokens = jnp.where(_dropped(k_drop, b, p)[:, None], null, tokens)
        return task.cond_model.apply({"params": cond_params}, tokens), None
    if task.task == "uncond":
        return None, None
    x = batch["image"]
    if task.task == "superres":
        return None, low_resolution(x, _latent_hw(task, x))
    if task.task == "inpaint":
        mask = batch["mask"] if "mask" in batch else random_box_masks(k_mask, x.shape[:3])
        masked = x * (1.0 - mask) - mask  # the hole is -1, as the paper's inpaint script
        z = encode_latents(task, vae_params, masked, k_enc)
        small = jax.image.resize(mask, z.shape[:3] + (1,), "nearest") * 2.0 - 1.0
        return None, jnp.concatenate([z, small], axis=-1)
    raise ValueError(f"training the '{task.task}' task is not supported")


def _latent_hw(task, x):
    f = 2 ** (len(task.vae.config.ch_mult) - 1)
    return x.shape[1] // f, x.shape[2] // f


def random_box_masks(rng, shape):
    """One random rectangle per image (1 = fill in), covering 1/8 to 1/2 of each side."""
    b, h, w = shape
    k = jax.random.split(rng, 4)
    hh = jax.random.randint(k[0], (b,), h // 8, h // 2 + 1)
    ww = jax.random.randint(k[1], (b,), w // 8, w // 2 + 1)
    y0 = (jax.random.uniform(k[2], (b,)) * (h - hh)).astype(jnp.int32)
    x0 = (jax.random.uniform(k[3], (b,)) * (w - ww)).astype(jnp.int32)
    ys, xs = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
    inside = ((ys >= y0[:, None, None]) & (ys < (y0 + hh)[:, None, None])
              & (xs >= x0[:, None, None]) & (xs < (x0 + ww)[:, None, None]))
    return inside[..., None].astype(jnp.float32)


def loss_fn(task, params, frozen, batch, rng, scale_factor):
    """The paper's simple loss: mean over the batch of the per-image mean l2 / l1 error."""
    k_lat, k_cond, k_t, k_noise = jax.random.split(rng, 4)
    z0 = batch_latents(task, frozen["vae"], batch, k_lat) * scale_factor
    cond_params = params.get("cond") if task.cond_trainable else frozen.get("cond")
    ctx, concat = conditioning(task, cond_params, frozen["vae"], batch, k_cond)
    b = z0.shape[0]
    abar = jnp.asarray(task.alphas_cumprod, jnp.float32)
    t = jax.random.randint(k_t, (b,), 0, abar.shape[0])
    noise = jax.random.normal(k_noise, z0.shape, jnp.float32)
    a = abar[t][:, None, None, None]
    zt = jnp.sqrt(a) * z0 + jnp.sqrt(1.0 - a) * noise
    x_in = zt if concat is None else jnp.concatenate([zt, concat.astype(zt.dtype)], axis=-1)
    pred = task.unet.apply({"params": params["unet"]}, x_in, t, ctx).astype(jnp.float32)
    target = training_target(z0, noise, abar[t], task.parameterization)
    return jnp.mean(diffusion_loss(pred, target, task.loss_type))


def gather_params(task, params):
    """FSDP: parameters cast to the compute dtype and gathered whole onto every device (`task.gather`)."""
    dtype = task.unet.dtype

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.lax.with_sharding_constraint(jax.tree_util.tree_map(cast, params), task.gather)


def gathered(task, params):
    """The parameters as the forward pass is given them: as they are, or with FSDP (`task.gather`)
    the shards of the models that gather each layer where it runs (`gathers_params`: the UNet and
    LDMBert, under `layers.param_gather`), and any other trainable model's parameters whole."""
    if task.gather is None:
        return params
    models = {"unet": task.unet, "cond": task.cond_model}
    return {name: tree if getattr(models.get(name), "gathers_params", False) else gather_params(task, tree)
            for name, tree in params.items()}


def train_step(task, tx, accumulate, state: TrainState, frozen, batch, base_rng):
    """One optimizer step (with `accumulate` micro-batches); returns (state, metrics)."""
    rng = jax.random.fold_in(base_rng, state.step)

    def grads_of(micro, key):
        with param_gather(None if task.gather is None else functools.partial(gather_params, task)):
            return jax.value_and_grad(
                lambda p: loss_fn(task, gathered(task, p), frozen, micro, key, state.scale_factor))(state.params)

    if accumulate == 1:
        loss, grads = grads_of(batch, rng)
    else:
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape((accumulate, x.shape[0] // accumulate) + x.shape[1:]), batch)

        def body(carry, xs):
            i, mb = xs
            l, g = grads_of(mb, jax.random.fold_in(rng, i))
            return jax.tree_util.tree_map(jnp.add, carry, (l, g)), None

        zero = (jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, state.params))
        (loss, grads), _ = jax.lax.scan(body, zero, (jnp.arange(accumulate), micro))
        loss, grads = jax.tree_util.tree_map(lambda x: x / accumulate, (loss, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
    ema = ema_update(state.ema, params["unet"], state.step, task.ema_max_decay) if task.use_ema else state.ema
    new = state.replace(step=state.step + 1, params=params, ema=ema, opt_state=opt_state)
    finite = jnp.isfinite(loss)
    new = keep_if_finite(finite, new, state)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
    return new, {"loss": loss, "grad_norm": grad_norm, "finite": finite}


def latent_std(task, vae_params, batch, rng):
    """1 / std of the (unscaled) latents of a global batch: the paper's scale_by_std."""
    z = batch_latents(task, vae_params, batch, rng)
    return 1.0 / jnp.std(z)


def null_tokens_for(tokenizer, max_length):
    return np.asarray(tokenizer.encode([""], max_length=max_length)[0], np.int32)
