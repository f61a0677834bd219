"""`train_and_evaluate(config, workdir)`: the LDM stage's loop (the autoencoder stage has its own).

Builds the mesh, models and sharded state (`jax.jit(init, out_shardings=...)`), restores the newest
checkpoint of `workdir` (state, data position), then runs the jitted, donated train step with
double-buffered metrics, periodic async checkpoints, sample grids, and a SIGTERM save.
"""
import dataclasses
import json
import os
import signal
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from latentdiff import parallel
from latentdiff.checkpoint import Checkpointer
from latentdiff.convert import loaders
from latentdiff.data import make_dataset
from latentdiff.runtime import COMPILER_OPTIONS, DTYPES
from latentdiff.training import ldm_step
from latentdiff.training.state import TrainState, make_optimizer, repack_state

DATA_KEYS = {"folder": ("root", "captions", "labels_from_dirs"), "array_record": ("path",),
             "tfds": ("name", "split", "data_dir"), "shapes": ("num_examples", "split")}
COMMON_DATA_KEYS = ("size", "random_crop", "random_flip", "batch_size", "num_workers")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the run stopped and the last checkpoint is the last good state."""


def compvis_params(model):
    """config.model (ConfigDict) -> the CompVis `model.params` layout that `build_ldm` reads."""
    p = model.to_dict()
    unet = dict(p["unet_config"]["params"])
    if not unet.get("context_dim"):
        unet.pop("context_dim", None)
    p["unet_config"] = {"params": unet}
    p["conditioning_key"] = p["conditioning_key"] or None
    return p


def data_config(data):
    d = data.to_dict()
    if d["source"] not in DATA_KEYS:
        raise ValueError(f"unknown data.source '{d['source']}'; one of {sorted(DATA_KEYS)}")
    keep = {k: d[k] for k in DATA_KEYS[d["source"]] + COMMON_DATA_KEYS if d.get(k) not in ("", None)}
    return {"source": d["source"], **keep}


def _first_stage_params(config, vae, dtype):
    path = config.model.first_stage_config.checkpoint
    if not path:
        warnings.warn("model.first_stage_config.checkpoint is empty: the first stage is randomly "
                      "initialised (fine for tests, meaningless for real training)")
        x = jnp.zeros((1, 2 ** len(vae.config.ch_mult), 2 ** len(vae.config.ch_mult), vae.config.in_channels))
        return jax.jit(vae.init)(jax.random.key(1), x)["params"]
    return loaders.load_first_stage(path, vae)


def _init_fns(spec, task, tx, config):
    """(rng -> fresh trainable params, params -> TrainState with its EMA and optimizer state)."""
    unet, cond = spec["unet"], spec["cond_model"]
    latent = config.model.image_size

    def init_params(rng):
        k_unet, k_cond = jax.random.split(rng)
        x, t, ctx, y = loaders.unet_example(unet, latent)
        params = {"unet": unet.init(k_unet, x, t, ctx, y)["params"]}
        if cond is not None and task.cond_trainable:
            params["cond"] = cond.init(k_cond, *loaders.cond_example(cond))["params"]
        return params

    def make_state(params):
        ema = params["unet"] if task.use_ema else {}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=ema,
                          opt_state=tx.init(params),
                          scale_factor=jnp.asarray(config.model.scale_factor, jnp.float32))

    return init_params, make_state


def abstract_train_state(init_params, make_state, rng):
    """The shapes and dtypes of a fresh TrainState (for shardings and checkpoint restore)."""
    return jax.eval_shape(lambda r: make_state(init_params(r)), rng)


def init_train_state(init_params, make_state, rng, shardings):
    """A fresh sharded state: parameters drawn on the host (`parallel.host_init`), the EMA and the
    optimizer state built from them on the devices."""
    params = parallel.host_init(init_params, rng, shardings.params)
    return jax.jit(make_state, out_shardings=shardings)(params)


def latent_cache(workdir, config, task, frozen, loader, mesh):
    """Encode this process's share of the data once (`workdir/latent_cache_<p>.npz`, reused on
    resume) and return a loader over the cached moments; the posterior is still sampled each step."""
    from latentdiff.data.cached import CachedLoader

    if task.task not in ("uncond", "class2img", "text2img"):
        raise ValueError(f"data.cache_latents supports unconditional, class and text models, not '{task.task}'")
    path = os.path.join(workdir, f"latent_cache_{jax.process_index()}.npz")
    if not os.path.exists(path):
        full = make_dataset(dict(data_config(config.data), random_flip=False, random_crop=False),
                            jax.process_index(), jax.process_count(), config.seed)
        full.shuffle, full.num_epochs, full.drop_remainder = False, 1, False
        encode = jax.jit(lambda v, x: ldm_step.first_stage_moments(task, v, x))
        parts = {}
        for batch in full:
            moments = np.asarray(encode(frozen["vae"], batch.pop("image")))
            for k, v in {**batch, "moments": moments}.items():
                parts.setdefault(k, []).append(np.asarray(v))
        np.savez(path, **{k: np.concatenate(v) for k, v in parts.items() if k != "index"})
        print(f"cached {sum(len(m) for m in parts['moments'])} latents in {path}")
    return CachedLoader(dict(np.load(path)), loader.batch_size, config.seed)


def _targets(abstract, shardings):
    """The restore target: each abstract array with its sharding."""
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def resume(ckpt, abstract, shardings, loader, workdir, legacy=None):
    """Restore the newest checkpoint straight into its shardings and the loader's position;
    None when the run is new. `legacy`: (abstract state, its shardings, function to the current
    state) of an older checkpoint layout, tried where the current one does not read."""
    if legacy is not None:
        old, old_shardings, convert = legacy
        legacy = (_targets(old, old_shardings), jax.jit(convert, out_shardings=shardings))
    restored = ckpt.restore(_targets(abstract, shardings), legacy=legacy)
    if restored is None:
        return None
    state, data_state, step = restored
    loader.set_state(data_state)
    print(f"resumed from step {step} in {workdir}")
    return state


def unpacked_layout(abstract, config, mesh):
    """The layout of LDM checkpoints written before `packed_small` (2026-11-30): (abstract state,
    shardings, function to the current layout), for `resume`'s `legacy`."""
    tx = make_optimizer(config.optim, config.train.steps, pack=False)
    old = abstract.replace(opt_state=jax.eval_shape(tx.init, abstract.params))
    return (old, parallel.tree_shardings(old, mesh, config.mesh.fsdp_min_size),
            lambda s: s.replace(opt_state=repack_state(s.opt_state, s.params)))


def _host_batch(batch, tokenizer, max_length):
    """Drop host-only keys; tokenise captions."""
    out = {k: v for k, v in batch.items() if k not in ("caption", "index")}
    if tokenizer is not None:
        out["tokens"] = tokenizer.encode([str(c) for c in batch["caption"]], max_length=max_length)
    return out


class _Stop:
    """SIGTERM -> save at the next step boundary and exit."""

    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, *_):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


def train_ldm(config, workdir):
    """Train the LDM stage of `config` in `workdir` (resuming from its newest checkpoint)."""
    os.makedirs(workdir, exist_ok=True)
    dtype = DTYPES[config.train.dtype]
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    parallel.check_batch(config.data.batch_size, mesh, config.optim.accumulate)
    spec = loaders.build_ldm(compvis_params(config.model), dtype)
    pconf = spec["config"]
    cs = config.model.cond_stage_config
    tokenizer = None
    if pconf.task == "text2img":
        from latentdiff.models.tokenizer import BertTokenizer

        if not cs.vocab:
            raise ValueError("a text-conditioned LDM needs model.cond_stage_config.vocab: a BERT "
                             "WordPiece vocab.txt (e.g. bert-base-uncased's)")
        tokenizer = BertTokenizer(cs.vocab)
    max_length = getattr(getattr(spec["cond_model"], "config", None), "max_length", 77)
    null_class = pconf.null_class
    if pconf.task == "class2img" and config.model.cond_drop_prob > 0 and null_class is None:
        null_class = spec["cond_model"].n_classes - 1  # the last class is the null label
        spec["config"] = dataclasses.replace(pconf, null_class=null_class)
    task = ldm_step.LDMTask(
        unet=spec["unet"], vae=spec["vae"], cond_model=spec["cond_model"], task=pconf.task,
        alphas_cumprod=spec["schedule"].alphas_cumprod, parameterization=config.model.parameterization,
        loss_type=config.model.loss_type, cond_trainable=bool(cs.trainable),
        cond_drop_prob=float(config.model.cond_drop_prob), null_class=null_class,
        null_tokens=None if tokenizer is None else ldm_step.null_tokens_for(tokenizer, max_length),
        ema_max_decay=config.train.ema_max_decay, use_ema=bool(config.train.ema),
        gather=parallel.replicated(mesh) if mesh.shape["fsdp"] > 1 else None)
    tx = make_optimizer(config.optim, config.train.steps)
    rng = jax.random.key(config.seed)

    # frozen parts: first stage, and the conditioning model when it is not trained
    frozen = {"vae": _first_stage_params(config, spec["vae"], dtype)}
    if spec["cond_model"] is not None and not task.cond_trainable:
        frozen["cond"] = spec["cond_model"].init(jax.random.key(2), *loaders.cond_example(spec["cond_model"]))["params"]
    frozen = jax.device_put(frozen, parallel.replicated(mesh))

    init_params, make_state = _init_fns(spec, task, tx, config)
    abstract = abstract_train_state(init_params, make_state, rng)
    state_sharding = parallel.tree_shardings(abstract, mesh, config.mesh.fsdp_min_size)

    loader = make_dataset(data_config(config.data), jax.process_index(), jax.process_count(), config.seed)
    if config.data.cache_latents:
        loader = latent_cache(workdir, config, task, frozen, loader, mesh)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.max_to_keep)
    state = resume(ckpt, abstract, state_sharding, loader, workdir, legacy=unpacked_layout(abstract, config, mesh))
    if state is None:
        state = init_train_state(init_params, make_state, rng, state_sharding)
        if config.model.scale_by_std:
            first = loader.get_state()
            batch = parallel.to_global(_host_batch(next(loader), tokenizer, max_length), mesh)
            loader.set_state(first)  # training starts with the same batch
            scale = jax.jit(lambda v, b: ldm_step.latent_std(task, v, b, jax.random.key(3)))(frozen["vae"], batch)
            state = state.replace(scale_factor=scale)
            print(f"scale_factor set from the first batch: {float(scale):.5f}")

    treedef = jax.tree_util.tree_structure(abstract)
    leaf_shardings = treedef.flatten_up_to(state_sharding)
    step_fn = jax.jit(
        parallel.on_leaves(lambda s, f, b, r: ldm_step.train_step(task, tx, config.optim.accumulate, s, f, b, r),
                           treedef),
        in_shardings=(leaf_shardings, parallel.replicated(mesh), parallel.batch_sharding(mesh), None),
        out_shardings=(leaf_shardings, None), donate_argnums=(0,), compiler_options=COMPILER_OPTIONS)
    return _run(config, workdir, state, frozen, loader, ckpt, step_fn, rng, mesh, tokenizer, max_length,
                spec, task)


def _run(config, workdir, state, frozen, loader, ckpt, step_fn, rng, mesh, tokenizer, max_length, spec, task):
    """The loop over `step_fn` (`parallel.on_leaves`: the state's leaves in, the new leaves out)."""
    from latentdiff.training.logging import MetricWriter, progress

    total = config.train.steps
    start = int(jax.device_get(state.step))
    leaves, treedef = jax.tree_util.tree_flatten(state)
    del state  # its arrays are donated to the first step: the state is rebuilt from `leaves` where needed
    current = lambda: jax.tree_util.tree_unflatten(treedef, leaves)  # noqa: E731
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    stop = _Stop()
    pending = None  # (step, metrics) of the previous step: read while the next one runs
    bar = progress(start, total, enabled=jax.process_index() == 0)
    t0, imgs = time.perf_counter(), 0
    step = start
    try:
        while step < total:
            batch = parallel.to_global(_host_batch(next(loader), tokenizer, max_length), mesh)
            if step == start:
                parallel.compile_together(step_fn, leaves, frozen, batch, rng)
            leaves, metrics = step_fn(leaves, frozen, batch, rng)
            step += 1
            imgs += config.data.batch_size
            if pending is not None:
                _check(pending, ckpt)
                if pending[0] % config.train.log_every == 0 or pending[0] == total:
                    rate = imgs / (time.perf_counter() - t0)
                    writer.write(pending[0], {k: float(v) for k, v in pending[1].items() if k != "finite"}
                                 | {"img_per_s": rate})
                    bar.set(pending[0], float(pending[1]["loss"]), rate)
            pending = (step, metrics)
            if step % config.train.ckpt_every == 0 or step == total or stop.requested:
                _check(pending, ckpt)
                ckpt.save(step, current(), loader.get_state(), {"skipped_images": loader.skipped})
            if config.train.sample_every and step % config.train.sample_every == 0:
                write_samples(config, workdir, spec, current(), frozen, tokenizer, step)
            if stop.requested:
                print(f"SIGTERM: saved step {step}, exiting")
                break
        if pending is not None:
            _check(pending, ckpt)
            rate = imgs / max(time.perf_counter() - t0, 1e-9)
            writer.write(pending[0], {k: float(v) for k, v in pending[1].items() if k != "finite"}
                         | {"img_per_s": rate})
            bar.set(pending[0], float(pending[1]["loss"]), rate)
    finally:
        ckpt.wait()
        bar.close()
        stop.restore()
        writer.close()
    if step == total:
        export_pipeline(workdir, spec, current(), frozen, tokenizer)
    summary = {"steps": step, "skipped_images": loader.skipped,
               "final_loss": float(pending[1]["loss"]) if pending else None}
    if jax.process_index() == 0:
        print("summary:", json.dumps(summary))
    return current(), summary


def _check(pending, ckpt):
    step, metrics = pending
    if not bool(jax.device_get(metrics["finite"])):
        ckpt.wait()
        last = ckpt.latest_step()
        raise NonFiniteLossError(f"the loss became {float(metrics['loss'])} at step {step}; the run stopped. "
                                 f"The last good checkpoint is step {last}.")


def pipeline_of(spec, state, frozen, tokenizer, use_ema=True):
    """A LatentDiffusionPipeline over the current (EMA) weights, for samples and export."""
    from latentdiff.pipeline import LatentDiffusionPipeline

    unet_params = state.ema if (use_ema and state.ema) else state.params["unet"]
    params = {"unet": unet_params, "vae": frozen["vae"]}
    if "cond" in state.params:
        params["cond"] = state.params["cond"]
    elif "cond" in frozen:
        params["cond"] = frozen["cond"]
    params = parallel.to_host(params)  # all processes take part; see write_samples / export_pipeline
    config = dataclasses.replace(spec["config"], scale_factor=float(jax.device_get(state.scale_factor)))
    unet = spec["unet"].clone(dtype=jnp.float32)
    return LatentDiffusionPipeline(unet=unet, vae=spec["vae"].clone(dtype=jnp.float32),
                                   cond_model=None if spec["cond_model"] is None else spec["cond_model"].clone(dtype=jnp.float32),
                                   tokenizer=tokenizer, schedule=spec["schedule"], config=config,
                                   params=params)


def write_samples(config, workdir, spec, state, frozen, tokenizer, step):
    """A PNG grid of samples from the EMA weights (every process gathers them, process 0 samples)."""
    from latentdiff.training.logging import save_grid

    pipe = pipeline_of(spec, state, frozen, tokenizer)
    if jax.process_index() != 0:
        return None
    task = spec["config"].task
    kw = dict(rng=jax.random.key(step), num_inference_steps=config.train.sample_steps,
              guidance_scale=config.train.guidance_scale)
    if task == "text2img":
        images = pipe(list(config.train.sample_prompts), **kw)
    elif task == "class2img":
        images = pipe(class_labels=list(config.train.sample_labels), **kw)
    elif task == "uncond":
        images = pipe(num_samples=config.train.num_sample, **kw)
    else:
        return None
    path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
    save_grid(images, path)
    return path


def export_pipeline(workdir, spec, state, frozen, tokenizer):
    """Write the trained model (EMA weights) in the format `from_pretrained(workdir)` reads
    (every process gathers them, process 0 writes)."""
    pipe = pipeline_of(spec, state, frozen, tokenizer)
    if jax.process_index() == 0:
        pipe.save_pretrained(os.path.join(workdir, "pipeline"))
