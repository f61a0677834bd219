"""The autoencoder stage: L1 + LPIPS + PatchGAN (adaptive weight, disc_start), KL or codebook terms.

Each step updates the autoencoder (Adam, betas 0.5/0.9), then the discriminator on the same batch
with the updated autoencoder's reconstructions, as the paper's two Lightning optimizers do.
"""
import functools
import json
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from typing import Any

from latentdiff import parallel
from latentdiff.checkpoint import Checkpointer
from latentdiff.data import make_dataset
from latentdiff.data.transforms import to_uint8
from latentdiff.losses import autoencoder_loss as L
from latentdiff.losses.discriminator import NLayerDiscriminator
from latentdiff.losses.lpips import LPIPS, load_lpips_params
from latentdiff.models.autoencoder import AutoencoderConfig, VQModel, first_stage_latents, make_autoencoder
from latentdiff.runtime import DTYPES
from latentdiff.training.loop import NonFiniteLossError, _Stop, data_config, resume
from latentdiff.training.state import keep_if_finite


class AEState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    disc_params: Any
    disc_stats: Any
    disc_opt_state: Any


def build_autoencoder(model, dtype=jnp.float32):
    """config.model (ConfigDict) -> AutoencoderKL or VQModel."""
    ae = AutoencoderConfig.from_compvis(model.ddconfig.to_dict(), model.embed_dim, model.n_embed or None)
    if ae.kind != model.target:
        raise ValueError(f"model.target '{model.target}' does not fit n_embed={model.n_embed} / double_z")
    return make_autoencoder(ae, dtype=dtype)


def init_variables(ae, disc, size, rng):
    """Fresh autoencoder and discriminator variables."""
    k1, k2 = jax.random.split(rng)
    x = jnp.zeros((1, size, size, ae.config.in_channels))
    dvars = disc.init(k2, x, train=False)
    return {"params": ae.init({"params": k1, "sample": k1}, x)["params"],
            "disc_params": dvars["params"], "disc_stats": dvars["batch_stats"]}


def state_from_variables(tx, disc_tx, v):
    """An AEState at step 0 with fresh optimizer states for the given variables."""
    return AEState(step=jnp.zeros((), jnp.int32), params=v["params"], opt_state=tx.init(v["params"]),
                   disc_params=v["disc_params"], disc_stats=v["disc_stats"],
                   disc_opt_state=disc_tx.init(v["disc_params"]))


def abstract_state(ae, disc, tx, disc_tx, size, rng):
    """The shapes and dtypes of a fresh AEState (for shardings and checkpoint restore)."""
    return jax.eval_shape(lambda r: state_from_variables(tx, disc_tx, init_variables(ae, disc, size, r)), rng)


def init_state(ae, disc, tx, disc_tx, size, rng, shardings):
    """A fresh AEState on `shardings`: variables drawn on the host (`parallel.host_init`), the
    optimizer states built from them on the devices."""
    v = parallel.host_init(functools.partial(init_variables, ae, disc, size), rng,
                           {k: getattr(shardings, k) for k in ("params", "disc_params", "disc_stats")})
    return jax.jit(functools.partial(state_from_variables, tx, disc_tx), out_shardings=shardings)(v)


def make_step(ae, disc, lpips, loss_cfg, tx, disc_tx):
    """The pure train step (state, lpips_params, images, rng) -> (state, metrics)."""
    kind = "vq" if isinstance(ae, VQModel) else "kl"
    w_p = float(loss_cfg.perceptual_weight)
    use_gan = float(loss_cfg.disc_weight) > 0  # disc_weight 0: no discriminator at all

    def perceptual(lpips_params, x, x_rec):
        if w_p == 0:
            return None
        return lpips.apply({"params": lpips_params}, x, x_rec)

    def reconstruct(params, x, rng):
        if kind == "kl":
            x_rec, post = ae.apply({"params": params}, x, sample_posterior=True, rng=rng)
            return x_rec.astype(jnp.float32), post.kl()
        x_rec, qloss, _ = ae.apply({"params": params}, x)
        return x_rec.astype(jnp.float32), qloss

    def generator_loss(params, state, lpips_params, x, rng):
        if not use_gan:
            return plain_loss(params, state, lpips_params, x, rng)

        def terms(kernel):
            x_rec, extra = reconstruct(L.replace_last_layer(params, kernel), x, rng)
            nll, rec = L.reconstruction_loss(x, x_rec, perceptual(lpips_params, x, x_rec), kind=kind,
                                             perceptual_weight=w_p)
            logits, new_stats = disc.apply({"params": state.disc_params, "batch_stats": state.disc_stats},
                                           x_rec, train=True, mutable=["batch_stats"])
            return (nll, L.gan_generator_loss(logits)), (extra, rec, new_stats["batch_stats"])

        (nll, g), d_weight, (extra, rec, stats) = L.calculate_adaptive_weight(
            terms, L.get_last_layer(params), float(loss_cfg.disc_weight), has_aux=True)
        if kind == "kl":
            loss, log = L.kl_generator_loss(nll, g, extra, d_weight, state.step, disc_start=loss_cfg.disc_start,
                                            kl_weight=float(loss_cfg.kl_weight), terms=rec)
        else:
            loss, log = L.vq_generator_loss(nll, g, extra, d_weight, state.step, disc_start=loss_cfg.disc_start,
                                            codebook_weight=float(loss_cfg.codebook_weight), terms=rec)
        return loss, (log, stats)

    def plain_loss(params, state, lpips_params, x, rng):
        """Without a GAN: reconstruction + KL / codebook terms only (no discriminator is run)."""
        x_rec, extra = reconstruct(params, x, rng)
        nll, rec = L.reconstruction_loss(x, x_rec, perceptual(lpips_params, x, x_rec), kind=kind,
                                         perceptual_weight=w_p)
        zero = jnp.zeros((), jnp.float32)
        generator = L.kl_generator_loss if kind == "kl" else L.vq_generator_loss
        weights = dict(kl_weight=float(loss_cfg.kl_weight)) if kind == "kl" else dict(
            codebook_weight=float(loss_cfg.codebook_weight))
        loss, log = generator(nll, zero, extra, zero, state.step, disc_start=loss_cfg.disc_start, terms=rec,
                              **weights)
        return loss, (log, state.disc_stats)

    def step(state, lpips_params, x, base_rng):
        rng = jax.random.fold_in(base_rng, state.step)
        grads, (log, stats) = jax.grad(generator_loss, has_aux=True)(state.params, state, lpips_params, x, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        finite = jnp.isfinite(log["total_loss"])
        if use_gan:
            new, dlog = discriminator_update(new, state, params, x, rng, stats)
            log = {**log, **dlog}
            finite = finite & jnp.isfinite(dlog["disc_loss"])
        return keep_if_finite(finite, new, state), {**log, "loss": log["total_loss"], "finite": finite}

    def discriminator_update(new, state, params, x, rng, stats):
        """D step on the real batch and the updated autoencoder's reconstructions."""
        x_rec = jax.lax.stop_gradient(reconstruct(params, x, rng)[0])

        def d_loss(dp, stats):
            real, s1 = disc.apply({"params": dp, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            fake, s2 = disc.apply({"params": dp, "batch_stats": s1["batch_stats"]}, x_rec, train=True,
                                  mutable=["batch_stats"])
            loss, dlog = L.discriminator_loss(real, fake, state.step, loss_cfg.disc_start,
                                              kind=loss_cfg.disc_loss)
            return loss, (dlog, s2["batch_stats"])

        dgrads, (dlog, stats) = jax.grad(d_loss, has_aux=True)(state.disc_params, stats)
        dupd, disc_opt_state = disc_tx.update(dgrads, state.disc_opt_state, state.disc_params)
        return new.replace(disc_params=optax.apply_updates(state.disc_params, dupd), disc_stats=stats,
                           disc_opt_state=disc_opt_state), dlog

    return step


def train_autoencoder(config, workdir):
    """Train the autoencoder of `config` in `workdir` (resuming from its newest checkpoint)."""
    from latentdiff.training.logging import MetricWriter, progress

    os.makedirs(workdir, exist_ok=True)
    dtype = DTYPES[config.train.dtype]
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    parallel.check_batch(config.data.batch_size, mesh)
    loss_cfg = config.model.loss
    lpips = LPIPS(dtype=dtype)
    lpips_params = {}
    if loss_cfg.perceptual_weight > 0:
        lpips_params = load_lpips_params(loss_cfg.lpips_weights or None)
    ae = build_autoencoder(config.model, dtype)
    disc = NLayerDiscriminator(n_layers=int(loss_cfg.disc_num_layers), dtype=dtype)
    tx = optax.adam(config.optim.lr, b1=config.optim.b1, b2=config.optim.b2)
    disc_tx = optax.adam(config.optim.lr, b1=config.optim.b1, b2=config.optim.b2)
    size = int(config.data.size)

    rng = jax.random.key(config.seed)
    abstract = abstract_state(ae, disc, tx, disc_tx, size, rng)
    shardings = parallel.tree_shardings(abstract, mesh, config.mesh.fsdp_min_size)
    lpips_params = jax.device_put(lpips_params, parallel.replicated(mesh))
    loader = make_dataset(data_config(config.data), jax.process_index(), jax.process_count(), config.seed)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.max_to_keep)
    state = resume(ckpt, abstract, shardings, loader, workdir)
    if state is None:
        state = init_state(ae, disc, tx, disc_tx, size, rng, shardings)
    treedef = jax.tree_util.tree_structure(abstract)
    leaf_shardings = treedef.flatten_up_to(shardings)
    step_fn = jax.jit(parallel.on_leaves(make_step(ae, disc, lpips, loss_cfg, tx, disc_tx), treedef),
                      in_shardings=(leaf_shardings, parallel.replicated(mesh), parallel.batch_sharding(mesh), None),
                      out_shardings=(leaf_shardings, None), donate_argnums=(0,))

    total, step = config.train.steps, int(jax.device_get(state.step))
    leaves = jax.tree_util.tree_leaves(state)
    del state  # donated to the first step: rebuilt from `leaves` where needed
    current = lambda: jax.tree_util.tree_unflatten(treedef, leaves)  # noqa: E731
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    bar, stop = progress(step, total, jax.process_index() == 0), _Stop()
    t0, imgs, metrics, x = time.perf_counter(), 0, None, None
    first = step
    try:
        while step < total:
            x = parallel.to_global(next(loader)["image"], mesh)
            if step == first:
                parallel.compile_together(step_fn, leaves, lpips_params, x, rng)
            leaves, metrics = step_fn(leaves, lpips_params, x, rng)
            step += 1
            imgs += config.data.batch_size
            if step % config.train.log_every == 0 or step == total or step % config.train.ckpt_every == 0:
                if not bool(jax.device_get(metrics["finite"])):
                    ckpt.wait()
                    raise NonFiniteLossError(f"the loss became non-finite at step {step}; the run stopped. "
                                             f"The last good checkpoint is step {ckpt.latest_step()}.")
                rate = imgs / (time.perf_counter() - t0)
                writer.write(step, {k: float(v) for k, v in metrics.items() if k != "finite"} | {"img_per_s": rate})
                bar.set(step, float(metrics["loss"]), rate)
            if step % config.train.ckpt_every == 0 or step == total or stop.requested:
                ckpt.save(step, current(), loader.get_state(), {"skipped_images": loader.skipped})
            if config.train.sample_every and step % config.train.sample_every == 0:
                host = parallel.to_host((current().params, x))  # every process takes part
                if jax.process_index() == 0:
                    save_reconstructions(ae, *host, os.path.join(workdir, "samples", f"recon_{step:08d}.png"))
            if stop.requested:
                print(f"SIGTERM: saved step {step}, exiting")
                break
    finally:
        ckpt.wait()
        bar.close()
        stop.restore()
        writer.close()
    if step == total:
        params = parallel.to_host(current().params)  # every process takes part
        if jax.process_index() == 0:
            export_autoencoder(workdir, config, params)
    summary = {"steps": step, "skipped_images": loader.skipped,
               "final_loss": None if metrics is None else float(metrics["loss"])}
    if jax.process_index() == 0:
        print("summary:", json.dumps(summary))
    return current(), summary


def save_reconstructions(ae, params, x, path):
    """A PNG with the inputs in the top row and their reconstructions below."""
    from latentdiff.training.logging import save_grid

    x = jax.device_get(x)[:8]
    ae32, params = ae.clone(dtype=jnp.float32), jax.device_get(params)
    z = first_stage_latents(ae32, params, jnp.asarray(x))
    x_rec = ae32.apply({"params": params}, z, method="decode")
    both = np.concatenate([np.asarray(x), np.asarray(x_rec)])
    save_grid(to_uint8(both), path, cols=len(x))


def export_autoencoder(workdir, config, params):
    """`workdir/autoencoder/`: params (orbax) + config, what an LDM's first_stage_config.checkpoint reads."""
    from latentdiff.convert.loaders import write_params

    out = os.path.join(os.path.abspath(workdir), "autoencoder")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.model.to_dict(), f, indent=1)
    write_params(os.path.join(out, "params"), params)
