"""Scaling of the txt2img UNet train step over the devices of one host (data parallel and FSDP).

    python benchmarks/scaling.py dp      # 1 vs N GPUs at the same per-GPU batch, interleaved repeats
    python benchmarks/scaling.py fsdp    # per-device memory of the 1.45B model (UNet + trainable
                                         # LDMBert): data parallel vs FSDP over N devices (compile only)
    python benchmarks/scaling.py dp --smoke   # tiny model, fake CPU devices (CI)

Uses the library's own pieces (`_init_fns`, `init_train_state`, `train_step`, the mesh and its
shardings); steps are timed back to back, as the training loop runs them. Prints JSON lines.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("what", choices=("dp", "fsdp"))
ap.add_argument("--smoke", action="store_true", help="tiny model on 2 fake CPU devices")
ap.add_argument("--per_gpu", type=int, default=64, help="batch per device")
ap.add_argument("--devices", type=int, default=0, help="devices to scale to (0: all)")
ap.add_argument("--reps", type=int, default=3, help="interleaved repeats")
args = ap.parse_args()
if args.smoke:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import bench  # noqa: E402
from latentdiff import parallel  # noqa: E402
from latentdiff.convert import loaders  # noqa: E402
from latentdiff.runtime import enable_compile_cache  # noqa: E402
from latentdiff.training import ldm_step  # noqa: E402
from latentdiff.training.loop import _init_fns, abstract_train_state, compvis_params, init_train_state  # noqa: E402

enable_compile_cache()
T0 = time.time()


def note(*a):
    print(f"[{time.time() - T0:6.1f} s]", *a, file=sys.stderr, flush=True)


def res(**kw):
    print(json.dumps(kw), flush=True)


def setup(model, n, fsdp, per_device, text_trainable=False, compile_only=False):
    """The compiled step on an n-device (data x fsdp) mesh, its state and batch, and XLA's
    per-device memory. `text_trainable` trains LDMBert too (tokens in the batch): the 1.45B setup."""
    cfg = bench._config(model, args.smoke, False)
    spec = loaders.build_ldm(compvis_params(cfg.model), jnp.bfloat16)
    if not text_trainable:
        spec = dict(spec, cond_model=None)  # the context is an input, as in bench.py
    task = ldm_step.LDMTask(unet=spec["unet"], vae=spec["vae"], cond_model=spec["cond_model"], task="text2img",
                            alphas_cumprod=spec["schedule"].alphas_cumprod, cond_trainable=True)
    tx = optax.adamw(1e-4, weight_decay=0.01)
    mesh = parallel.make_mesh(data=n // fsdp, fsdp=fsdp, devices=jax.devices()[:n])
    init_params, make_state = _init_fns(spec, task, tx, cfg)
    abstract = abstract_train_state(init_params, make_state, jax.random.key(0))
    shardings = parallel.tree_shardings(abstract, mesh)
    b, hw, ctx_dim = per_device * n, cfg.model.image_size, spec["unet"].config.context_dim
    bs = parallel.batch_sharding(mesh)
    shapes = {"moments": ((b, hw, hw, 8), jnp.float32),
              **({"tokens": ((b, 77), jnp.int32)} if text_trainable else {"context": ((b, 77, ctx_dim), jnp.float32)})}
    step = jax.jit(lambda s, x, r: ldm_step.train_step(task, tx, 1, s, {"vae": None}, x, r),
                   in_shardings=(shardings, bs, None), out_shardings=(shardings, None), donate_argnums=(0,))
    t = time.time()
    abstract_batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=bs) for k, (shape, dt) in shapes.items()}
    compiled = step.lower(abstract, abstract_batch, jax.random.key(1)).compile()
    note(model, f"{n} devices, fsdp {fsdp}: compiled in {time.time() - t:.1f} s")
    m = compiled.memory_analysis()
    memory = dict(args_gib=round(m.argument_size_in_bytes / 2 ** 30, 2), temp_gib=round(m.temp_size_in_bytes / 2 ** 30, 2))
    if compile_only:
        return None, None, None, memory
    state = init_train_state(init_params, make_state, jax.random.key(0), shardings)
    keys = jax.random.split(jax.random.key(2), len(shapes))
    batch = {k: jax.device_put(jax.random.normal(key, shape), bs) for key, (k, (shape, _)) in zip(keys, shapes.items())}
    return compiled, [state], batch, memory


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


N = args.devices or jax.device_count()
P = args.per_gpu if not args.smoke else 2
if args.what == "dp":
    c1, h1, b1, m1 = setup("txt2img_1p4b", 1, 1, P)
    cn, hn, bn, mn = setup("txt2img_1p4b", N, 1, P)
    for r in range(args.reps):
        s1, sn = time_it(c1, h1, b1), time_it(cn, hn, bn)
        res(what="dp_scaling", devices=N, per_device_batch=P, rep=r, one_img_per_s=round(P / s1, 1),
            all_img_per_s=round(N * P / sn, 1), efficiency=round(s1 / sn, 4), memory_one=m1, memory_all=mn)
else:
    for fsdp in (1, N):
        m = setup("txt2img_1p4b", N, fsdp, P, text_trainable=True, compile_only=True)[3]
        res(what="memory_1p45b", mesh=f"data={N // fsdp} fsdp={fsdp}", per_device_batch=P, **m)
