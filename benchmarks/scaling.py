"""Scaling over the devices of one host: the txt2img UNet train step (data parallel, FSDP), the
1.45B model's per-device memory, and sampling.

    python benchmarks/scaling.py dp       # 1 vs N GPUs at the same per-GPU batch, interleaved repeats,
                                          # for each --variants entry (mesh and XLA scheduling)
    python benchmarks/scaling.py fsdp     # the 1.45B model (UNet + trainable LDMBert): per-device
                                          # memory of data parallel vs FSDP over N devices (compile
                                          # only); --time also times the steps, --meshes=fsdp
                                          # one of them
    python benchmarks/scaling.py sample   # 50-step guided DDIM, the same per-GPU batch on 1 vs N GPUs
    python benchmarks/scaling.py dp --smoke   # tiny model, 2 fake CPU devices (CI runs all three)

Uses the library's own pieces (`_init_fns`, `init_train_state`, `train_step`, the mesh and its
shardings, `LatentDiffusionPipeline`); steps are timed back to back, as the training loop runs them.
Prints JSON lines.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

# (fsdp axis size: 1 or all devices, XLA options the step is compiled with)
LHS = {"xla_gpu_enable_latency_hiding_scheduler": True}
VARIANTS = {"dp": ("dp", {}), "dp_lhs": ("dp", LHS), "fsdp": ("fsdp", {}), "fsdp_lhs": ("fsdp", LHS)}

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("what", choices=("dp", "fsdp", "sample"))
ap.add_argument("--smoke", action="store_true", help="tiny model on 2 fake CPU devices")
ap.add_argument("--per_gpu", type=int, default=64, help="batch per device")
ap.add_argument("--devices", type=int, default=0, help="devices to scale to (0: all)")
ap.add_argument("--reps", type=int, default=3, help="interleaved repeats")
ap.add_argument("--variants", default="dp,dp_lhs", help=f"dp: comma-separated, of {sorted(VARIANTS)}")
ap.add_argument("--remat", action="store_true", help="fsdp: activation checkpointing in the UNet")
ap.add_argument("--time", action="store_true", help="fsdp: also run and time the steps")
ap.add_argument("--meshes", default="dp,fsdp", help="fsdp: which of dp,fsdp to compile (and time)")
args = ap.parse_args()
if args.smoke:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench  # noqa: E402
from latentdiff import parallel  # noqa: E402
from latentdiff.convert import loaders  # noqa: E402
from latentdiff.runtime import COMPILER_OPTIONS, enable_compile_cache  # noqa: E402
from latentdiff.training import ldm_step  # noqa: E402
from latentdiff.training.loop import _init_fns, abstract_train_state, compvis_params, init_train_state  # noqa: E402
from latentdiff.training.state import make_optimizer  # noqa: E402

enable_compile_cache()
T0 = time.time()
MODEL = "txt2img_1p4b"


def note(*a):
    print(f"[{time.time() - T0:6.1f} s]", *a, file=sys.stderr, flush=True)


def res(**kw):
    print(json.dumps(kw), flush=True)


class Step:
    """The txt2img train step of the benchmark (`text_trainable`: LDMBert trained too, tokens in the
    batch: the 1.45B setup) and what it needs: compiled per mesh and XLA options."""

    def __init__(self, per_device, text_trainable=False, remat=False):
        cfg = bench._config(MODEL, args.smoke, remat)
        spec = loaders.build_ldm(compvis_params(cfg.model), jnp.bfloat16)
        if not text_trainable:
            spec = dict(spec, cond_model=None)  # the context is an input, as in bench.py
        self.task = ldm_step.LDMTask(unet=spec["unet"], vae=spec["vae"], cond_model=spec["cond_model"],
                                     task="text2img", alphas_cumprod=spec["schedule"].alphas_cumprod,
                                     cond_trainable=True)
        self.tx = make_optimizer(cfg.optim, cfg.train.steps)  # train.py's optimizer
        self.init_params, self.make_state = _init_fns(spec, self.task, self.tx, cfg)
        self.abstract = abstract_train_state(self.init_params, self.make_state, jax.random.key(0))
        self.per_device, hw = per_device, cfg.model.image_size
        self.shapes = {"moments": ((hw, hw, 8), jnp.float32),
                       **({"tokens": ((77,), jnp.int32)} if text_trainable
                          else {"context": ((77, spec["unet"].config.context_dim), jnp.float32)})}

    def compile(self, n, fsdp, options=None):
        """(compiled step, state shardings, batch sharding, XLA's per-device memory in GiB)."""
        mesh = parallel.make_mesh(data=n // fsdp, fsdp=fsdp, devices=jax.devices()[:n])
        shardings, bs = parallel.tree_shardings(self.abstract, mesh), parallel.batch_sharding(mesh)
        b = self.per_device * n
        batch = {k: jax.ShapeDtypeStruct((b, *shape), dt, sharding=bs) for k, (shape, dt) in self.shapes.items()}
        task = dataclasses.replace(self.task, gather=parallel.replicated(mesh) if fsdp > 1 else None)
        step = jax.jit(lambda s, x, r: ldm_step.train_step(task, self.tx, 1, s, {"vae": None}, x, r),
                       in_shardings=(shardings, bs, None), out_shardings=(shardings, None), donate_argnums=(0,),
                       compiler_options=COMPILER_OPTIONS)
        t = time.time()
        compiled = step.lower(self.abstract, batch, jax.random.key(1)).compile(compiler_options=options or None)
        note(f"{n} devices, fsdp {fsdp}, {options or 'default'}: compiled in {time.time() - t:.1f} s")
        return compiled, shardings, bs, bench.xla_memory(compiled)

    def batch(self, n, sharding):
        keys = jax.random.split(jax.random.key(2), len(self.shapes))
        return {k: jax.device_put(jax.random.normal(key, (self.per_device * n, *shape)).astype(dt), sharding)
                for key, (k, (shape, dt)) in zip(keys, self.shapes.items())}


def time_it(compiled, holder, batch, reps=10):
    """Seconds per step, steps queued back to back after 3 warm-up steps."""
    for _ in range(3):
        holder[0], metrics = compiled(holder[0], batch, jax.random.key(1))
    jax.block_until_ready(metrics["loss"])
    t = time.perf_counter()
    for _ in range(reps):
        holder[0], metrics = compiled(holder[0], batch, jax.random.key(1))
    jax.block_until_ready(metrics["loss"])
    return (time.perf_counter() - t) / reps


def data_parallel(n, per_device):
    """One device against n, for every variant: the state drawn once and copied to each layout."""
    step = Step(per_device)
    c1, sh1, bs1, m1 = step.compile(1, 1)
    state = init_train_state(step.init_params, step.make_state, jax.random.key(0), sh1)
    runs = {"one": (c1, [state], step.batch(1, bs1))}
    for name in args.variants.split(","):
        layout, options = VARIANTS[name]
        c, sh, bs, m = step.compile(n, n if layout == "fsdp" else 1, options)
        runs[name] = (c, [jax.device_put(jax.jit(lambda s: jax.tree_util.tree_map(jnp.copy, s))(state), sh)],
                      step.batch(n, bs))  # a copy: the one-device run donates `state`
        res(what="dp_memory", variant=name, devices=n, per_device_batch=per_device, one=m1, all=m)
    for r in range(args.reps):
        s1 = time_it(*runs["one"])
        for name in args.variants.split(","):
            sn = time_it(*runs[name])
            res(what="dp_scaling", variant=name, devices=n, per_device_batch=per_device, rep=r,
                one_img_per_s=round(per_device / s1, 1), all_img_per_s=round(n * per_device / sn, 1),
                efficiency=round(s1 / sn, 4))


def fsdp_memory(n, per_device):
    """The 1.45B model over n devices, data parallel against FSDP: XLA's per-device memory (compiled
    without autotuning unless --time) and, with --time, the step time of each."""
    step = Step(per_device, text_trainable=True, remat=args.remat)
    options = None if args.time else {"xla_gpu_autotune_level": 0}
    host_state = None
    for fsdp in [{"dp": 1, "fsdp": n}[m] for m in args.meshes.split(",")]:
        compiled, sh, bs, m = step.compile(n, fsdp, None if args.smoke else options)
        row = dict(what="memory_1p45b", mesh=f"data={n // fsdp} fsdp={fsdp}", per_device_batch=per_device,
                   remat=args.remat, **m)
        if args.time:  # the state is drawn once (two minutes on the host for 1.45B) and laid out per mesh
            if host_state is None:
                host_state = parallel.to_host(init_train_state(step.init_params, step.make_state,
                                                               jax.random.key(0), sh))
            seconds = time_it(compiled, [jax.device_put(host_state, sh)], step.batch(n, bs))
            stats = jax.devices()[0].memory_stats() or {}
            row.update(step_s=round(seconds, 4), img_per_s=round(n * per_device / seconds, 1),
                       peak_gib=bench.gib(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None)
        res(**row)


def sampling(n, per_device):
    """50 guided DDIM steps + decoding, per_device images on each of 1 and n devices (one pipeline,
    its `devices` switched), interleaved repeats."""
    sample_args = argparse.Namespace(smoke=args.smoke, param_dtype="bfloat16", dtype="bfloat16",
                                     steps=2 if args.smoke else 50, warmup=1, reps=3)
    pipe = bench._txt2img_pipeline(sample_args, jnp.bfloat16)
    rng = jax.random.key(0)

    def seconds(devices):
        pipe.devices = devices
        prompts = ["a red circle at the top left"] * (per_device * len(devices))
        return bench._median_time(lambda: pipe(prompts, rng=rng, num_inference_steps=sample_args.steps,
                                               guidance_scale=6.0), sample_args.warmup, sample_args.reps)

    for r in range(args.reps):
        s1, sn = seconds(jax.devices()[:1]), seconds(jax.devices()[:n])
        res(what="sample_scaling", devices=n, per_device_batch=per_device, rep=r, one_img_per_s=round(per_device / s1, 2),
            all_img_per_s=round(n * per_device / sn, 2), efficiency=round(s1 / sn, 4))


N = args.devices or jax.device_count()
P = 2 if args.smoke else args.per_gpu
{"dp": data_parallel, "fsdp": fsdp_memory, "sample": sampling}[args.what](N, P)
