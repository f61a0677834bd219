"""Training and sampling speed of the paper's models on the current accelerator, beside the PyTorch peer.

    python benchmarks/bench.py                                    # every case, then the table
    python benchmarks/bench.py --cases=train_txt2img,sample_b16   # some of them
    python benchmarks/bench.py --peer=../shared/bench/peer_torch.py   # and diffusers, same GPU
    python benchmarks/bench.py --cases=peer_train --peer=../shared/bench/peer_torch.py   # the peer's step alone
    python benchmarks/bench.py --smoke                            # tiny models, 1 repeat (CI, CPU)

Each case runs in its own process (so its peak memory is its own) and prints one JSON line; our
timed cases run after a process that compiled them into the compile cache, so that their peak is
the program's and not XLA's autotuning scratch (that first run's peak is `first_peak_gib`). The
driver collects them into `--out` (JSON lines) and prints a markdown table. Timings are medians
over `--reps` after warm-up, each step waited for as the peer does; LDM training also reports
`pipelined_img_per_s`, steps dispatched back to back as the training loop runs them. MFU uses the
reference FLOP counts for the full-size UNets and XLA's count otherwise, against `--peak_tflops`
(dense bf16 of an H100/H200 by default). Cases:

  train_txt2img   the txt2img UNet (872M; 32x32x4 latents, 77x1280 context given), batch 64
  train_txt2img_no_ema  the same without our EMA of the UNet: the peer's work exactly
  train_cin256    the cin256-v2 UNet (401M; 64x64x3 latents, one head, class labels), batch 64, no EMA
                  as its released config; beside it `peer_train_cin256`, diffusers' same UNet
                  (`peer_models.py`, run by --peer like the reference peer's cases)
  train_kl_f8     the KL-f8 autoencoder with LPIPS and the PatchGAN (both updates), 256 px, batch 8;
                  beside it `peer_train_kl_f8`, the same step in PyTorch (`peer_models.py`)
  sample_b{1,16,64}  txt2img (LDMBert + UNet + decoder) 50 DDIM steps, guidance 6, one jitted program
  sample_loop_b{1,16}  the UNet's 50 guided DDIM steps alone from a given context: the peer's work
  bf16_check      bf16 vs fp32 on the same inputs: UNet output and one sampled image (relative error)
  bf16_vs_torch   the same for the txt2img UNet and diffusers' with torch autocast, on the same weights
                  (diffusers' random init) and inputs: how our bf16 error compares with torch's
                  (needs torch and diffusers; run by --peer without --cases, or named in --cases)
  kernel_check    our GPU kernels against XLA on the same inputs (GEGLU's projection and gate in one
                  kernel, at the txt2img UNet's four shapes): largest difference, microseconds of each

The real code paths run: `ldm_step.train_step` (AdamW, EMA, finite guard), the autoencoder loop's
step, and `LatentDiffusionPipeline.__call__` (tokenising, device transfer and the uint8 images).
"""
import argparse
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = ("train_txt2img", "train_txt2img_no_ema", "train_cin256", "train_kl_f8", "sample_b1", "sample_b16",
         "sample_b64", "sample_loop_b1", "sample_loop_b16", "bf16_check", "kernel_check")
# the peer cases that `peer_models.py` (beside this file) runs: its function, model and batch, and our case
OWN_PEERS = {"peer_train_cin256": ("bench_train", "cin256", 64, "train_cin256"),
             "peer_train_kl_f8": ("bench_train_autoencoder", "kl_f8", 8, "train_kl_f8")}
PEER_CASES = ("peer_train", "peer_sample_b16", "peer_sample_b1") + tuple(OWN_PEERS)
TORCH_CASES = ("bf16_vs_torch",)  # need torch and diffusers; run by --peer without --cases


def _note(what):
    """Progress on stderr, with the time since start (compiles of the big models take minutes)."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {what}", file=sys.stderr, flush=True)


_T0 = time.perf_counter()


_PROFILE = {}  # --profile: the running case's trace directory, then its kernel summary
_WARM = {}  # --warm: the case stops after its first timed call (see `_subprocess_row`)


class _Warmed(Exception):
    """Raised by `_median_time` in a --warm run once the case's program has been compiled and run."""


def _median_time(fn, warmup, reps):
    """Median seconds of fn() (which must block until its work is done); with --profile, one more
    call traced (the first timed function of a case)."""
    if _WARM:
        fn()
        raise _Warmed
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    if _PROFILE.get("dir") and "summary" not in _PROFILE:
        import kernel_profile

        _PROFILE["summary"] = kernel_profile.profile(fn, _PROFILE["dir"])
    return sorted(times)[len(times) // 2]


def _peak_memory_gib():
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2 ** 30, 2)


def gib(n):
    return round(n / 2 ** 30, 4)


def xla_memory(compiled):
    """XLA's memory analysis of a compiled program, GiB per device: arguments, temporaries and the
    total live at once (outputs that do not reuse a donated argument included)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return dict(args_gib=gib(m.argument_size_in_bytes), temp_gib=gib(m.temp_size_in_bytes),
                total_gib=gib(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                              - m.alias_size_in_bytes))


def _flops(lowered):
    """XLA's FLOP count of a lowered step: before GPU compilation, whose cuDNN convolutions (custom
    calls) the compiled program's cost analysis does not count."""
    try:
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])
    except Exception:  # not every backend reports costs
        return None


def _config(name, smoke, remat):
    """A released model's config; with smoke, the same structure shrunk to run in seconds on a CPU."""
    cfg = importlib.import_module(f"configs.{name}").get_config()
    m = cfg.model
    u = m.unet_config.params
    u.use_checkpoint = bool(remat)
    if m.cond_stage_config.target.endswith("BERTEmbedder"):  # a trainable text encoder's layers too
        m.cond_stage_config.params.use_checkpoint = bool(remat)
    if smoke:
        u.update(dict(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_res_blocks=1,
                      num_heads=2 if u.num_heads > 1 else 1, num_head_channels=-1,
                      context_dim=32 if u.context_dim else None, image_size=8))
        m.image_size = 8
        dd = m.first_stage_config.params.ddconfig
        dd.update(dict(ch=32, ch_mult=(1,) * len(dd.ch_mult), num_res_blocks=1,
                       resolution=8 * 2 ** (len(dd.ch_mult) - 1)))
        if m.cond_stage_config.target.endswith("BERTEmbedder"):
            m.cond_stage_config.params = dict(n_embed=32, n_layer=1, heads=2, dim_head=16)
        if m.cond_stage_config.target.endswith("ClassEmbedder"):
            m.cond_stage_config.params = dict(n_classes=1001, embed_dim=32)
    return cfg


def _dtype(name):
    from latentdiff.runtime import DTYPES

    return DTYPES[name]


def train_ldm_case(name, batch, args, use_ema=True):
    """Img/s of the real LDM train step; text models get the context as input, as the peer does."""
    import jax
    import jax.numpy as jnp

    from latentdiff.convert import loaders
    from latentdiff.training import ldm_step
    from latentdiff import parallel
    from latentdiff.training.loop import _init_fns, abstract_train_state, compvis_params, init_train_state
    from latentdiff.training.state import make_optimizer
    from latentdiff.runtime import COMPILER_OPTIONS

    cfg = _config(name, args.smoke, args.remat)
    spec = loaders.build_ldm(compvis_params(cfg.model), _dtype(args.dtype))
    text = spec["config"].task == "text2img"
    if text:
        spec = dict(spec, cond_model=None)  # the context is an input, as in the peer
    task = ldm_step.LDMTask(unet=spec["unet"], vae=spec["vae"], cond_model=spec["cond_model"],
                            task=spec["config"].task, alphas_cumprod=spec["schedule"].alphas_cumprod,
                            cond_trainable=True, cond_drop_prob=0.0, ema_max_decay=0.9999, use_ema=use_ema)
    tx = make_optimizer(cfg.optim, cfg.train.steps)  # train.py's optimizer
    _note("building the train state")
    init_params, make_state = _init_fns(spec, task, tx, cfg)
    shardings = parallel.tree_shardings(abstract_train_state(init_params, make_state, jax.random.key(0)),
                                        parallel.make_mesh())
    state = init_train_state(init_params, make_state, jax.random.key(0), shardings)
    jax.block_until_ready(state)
    _note("state ready; compiling the step")
    ucfg = spec["unet"].config
    hw, c = cfg.model.image_size, ucfg.in_channels
    keys = jax.random.split(jax.random.key(1), 3)
    # cached first-stage output: VQ latents, or KL posterior moments (mean | logvar)
    data = {"moments": jax.random.normal(keys[0], (batch, hw, hw, c if _is_vq(spec) else 2 * c))}
    if text:
        data["context"] = jax.random.normal(keys[1], (batch, 77, ucfg.context_dim), jnp.float32)
    else:
        data["class_label"] = jax.random.randint(keys[1], (batch,), 0, 1000)
    params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    treedef = jax.tree_util.tree_structure(state)
    step = jax.jit(parallel.on_leaves(lambda s, b, r: ldm_step.train_step(task, tx, 1, s, {"vae": None}, b, r),
                                      treedef), donate_argnums=(0,), compiler_options=COMPILER_OPTIONS)
    state = jax.tree_util.tree_leaves(state)  # as the training loop holds it (`parallel.on_leaves`)
    t0 = time.perf_counter()
    lowered = step.lower(state, data, keys[2])
    compiled = lowered.compile()
    _note(f"compiled in {time.perf_counter() - t0:.1f} s")
    holder = [state]

    # timed through jit, as the training loop calls it (a faster dispatch than `compiled(...)`); jit
    # reuses the executable that `compile()` above built
    def run():
        holder[0], metrics = step(holder[0], data, keys[2])
        jax.block_until_ready(metrics["loss"])

    seconds = _median_time(run, args.warmup, args.reps)
    t0 = time.perf_counter()  # as the training loop runs: the next step dispatched before this one ends
    for _ in range(args.reps):
        holder[0], metrics = step(holder[0], data, keys[2])
    jax.block_until_ready(metrics["loss"])
    pipelined = (time.perf_counter() - t0) / args.reps
    flops = _flops(lowered)
    return dict(batch=batch, params_M=round(params / 1e6, 1), step_s=round(seconds, 4),
                img_per_s=round(batch / seconds, 1), pipelined_img_per_s=round(batch / pipelined, 1),
                xla_memory=xla_memory(compiled), **_mfu(flops, seconds, args, name, batch))


def _is_vq(spec):
    from latentdiff.models.autoencoder import VQModel

    return isinstance(spec["vae"], VQModel)


# Training GFLOP per image (3x forward) from the reference counter (conv/linear and attention
# matmuls; ../shared/bench/unet_flops.py): XLA's cost analysis misses the work of cuDNN calls on GPUs.
TRAIN_GFLOP_PER_IMAGE = {"txt2img_1p4b": 546.0, "cin256_v2": 625.0}


def _mfu(flops, seconds, args, model=None, batch=None):
    """XLA's FLOP count of the compiled step per second, and MFU from the reference count when the
    model is a full-size one (XLA's count otherwise, as in smoke mode)."""
    if flops is None:
        return {}
    per_s = flops / seconds
    if model in TRAIN_GFLOP_PER_IMAGE and not args.smoke:
        per_s = TRAIN_GFLOP_PER_IMAGE[model] * 1e9 * batch / seconds
    return dict(tflops_per_s=float(f"{per_s / 1e12:.3g}"), mfu=float(f"{per_s / (args.peak_tflops * 1e12):.3g}"))


def train_autoencoder_case(batch, args):
    """Img/s of the autoencoder loop's step (L1 + LPIPS + KL, then the discriminator update)."""
    import jax
    import optax

    from latentdiff.losses.discriminator import NLayerDiscriminator
    from latentdiff.losses.lpips import LPIPS
    from latentdiff import parallel
    from latentdiff.training.autoencoder_loop import abstract_state, build_autoencoder, init_state, make_step

    cfg = importlib.import_module("configs.kl_f8").get_config()
    dtype = _dtype(args.dtype)
    size = 256
    if args.smoke:
        cfg.model.ddconfig.update(dict(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, resolution=32))
        size = 32
    loss = cfg.model.loss
    loss.disc_start = 0  # the GAN half runs, as after disc_start in the paper
    ae, lpips = build_autoencoder(cfg.model, dtype), LPIPS(dtype=dtype)
    disc = NLayerDiscriminator(n_layers=int(loss.disc_num_layers), dtype=dtype)
    tx, disc_tx = optax.adam(4.5e-6, b1=0.5, b2=0.9), optax.adam(4.5e-6, b1=0.5, b2=0.9)
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.uniform(k[0], (batch, size, size, 3), minval=-1.0, maxval=1.0)

    shardings = parallel.tree_shardings(abstract_state(ae, disc, tx, disc_tx, size, k[1]), parallel.make_mesh())
    state = init_state(ae, disc, tx, disc_tx, size, k[1], shardings)
    lpips_params = jax.jit(lpips.init)(k[2], x[:1], x[:1])["params"]  # random weights: speed only
    treedef = jax.tree_util.tree_structure(state)
    step = jax.jit(parallel.on_leaves(make_step(ae, disc, lpips, loss, tx, disc_tx), treedef), donate_argnums=(0,))
    state = jax.tree_util.tree_leaves(state)  # as the training loop holds it
    t0 = time.perf_counter()
    lowered = step.lower(state, lpips_params, x, k[3])
    lowered.compile()  # kept by jit for the calls below
    _note(f"compiled in {time.perf_counter() - t0:.1f} s")
    holder = [state]

    def run():  # through jit, as the training loop calls it
        holder[0], metrics = step(holder[0], lpips_params, x, k[3])
        jax.block_until_ready(jax.tree_util.tree_leaves(metrics))

    seconds = _median_time(run, args.warmup, args.reps)
    return dict(batch=batch, size=size, step_s=round(seconds, 4), img_per_s=round(batch / seconds, 1),
                **_mfu(_flops(lowered), seconds, args))


@functools.lru_cache(maxsize=None)
def _txt2img_spec(smoke, dtype):
    from latentdiff.convert import loaders
    from latentdiff.training.loop import compvis_params

    return loaders.build_ldm(compvis_params(_config("txt2img_1p4b", smoke, remat=False).model), dtype)


def _init_constants(init):
    """Shapes of `init()`'s parameters and, per leaf, the constant it is initialised to (flax's
    zeros and ones: biases, norm scales, zero-initialised output layers) or None (random), read
    from its traced program without compiling or running it."""
    import jax

    closed, shapes = jax.make_jaxpr(init, return_shape=True)()
    made_by = {id(v): e for e in closed.jaxpr.eqns for v in e.outvars}

    def constant(v):
        e = made_by.get(id(v))
        if e is not None and e.primitive.name == "broadcast_in_dim" and hasattr(e.invars[0], "val"):
            return float(e.invars[0].val)
        return None

    return shapes, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes),
                                                [constant(v) for v in closed.jaxpr.outvars])


def _random_leaf(gen, path, shape, constant, dtype):
    """One parameter drawn by numpy: its constant init (if any) or N(0, 1/fan_in) (flax's lecun
    normal; Dense kernels (in, out), Conv2D kernels (out, kh, kw, in), embeddings 1/width), plus
    N(0, 0.02^2) everywhere so that no weight is zero."""
    import numpy as np

    noise = gen.standard_normal(shape, dtype=np.float32)
    if constant is None:
        name = getattr(path[-1], "key", "")
        fan_in = shape[-1] if name == "embedding" else shape[0] if len(shape) == 2 else int(np.prod(shape[1:]))
        noise *= np.float32((1.0 / fan_in + 0.02 ** 2) ** 0.5)
    else:
        noise *= np.float32(0.02)
        noise += np.float32(constant)
    return noise.astype(dtype)


@functools.lru_cache(maxsize=None)
def _random_params(smoke, dtype):
    """Random weights of the txt2img model (UNet, KL-f8, LDMBert) on the host, stored in `dtype` (no
    fp32 copy to put on the device and count in the peak memory), none of them zero (the
    zero-initialised output convs would make the UNet predict 0 and the sampler trivial). Drawn by numpy, per leaf, after
    flax's init (`_init_constants`): seconds, where compiling the init program for the CPU took two
    minutes for the 1.45B model. Shared by the cases of one process."""
    import jax
    import numpy as np

    from latentdiff.convert import loaders

    spec = _txt2img_spec(smoke, jax.numpy.float32)
    size = spec["unet"].config.size_multiple
    k = jax.random.key(0)
    shapes, constants = _init_constants(lambda: {
        "unet": spec["unet"].init(k, *loaders.unet_example(spec["unet"], size))["params"],
        "vae": spec["vae"].init({"params": k, "sample": k}, jax.numpy.zeros((1, 8 * size, 8 * size, 3)))["params"],
        "cond": spec["cond_model"].init(k, *loaders.cond_example(spec["cond_model"]))["params"]})
    gen = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(lambda p, a, c: _random_leaf(gen, p, a.shape, c, dtype),
                                            shapes, constants, is_leaf=lambda x: x is None)


def _txt2img_pipeline(args, dtype, params=None):
    """The 1.45B txt2img pipeline computing in `dtype`, on `params` (device arrays) or on the random
    weights in `args.param_dtype`, put on the device."""
    import jax

    from latentdiff.models.tokenizer import BertTokenizer
    from latentdiff.pipeline import LatentDiffusionPipeline

    spec = _txt2img_spec(args.smoke, dtype)
    if params is None:
        params = jax.device_put(_random_params(args.smoke, _dtype(args.param_dtype)), jax.devices()[0])
    vocab = os.path.join(ROOT, "configs", "shapes_vocab.txt")
    return LatentDiffusionPipeline(unet=spec["unet"], vae=spec["vae"], cond_model=spec["cond_model"],
                                   schedule=spec["schedule"], config=spec["config"], params=params,
                                   tokenizer=BertTokenizer(vocab))


def sample_case(batch, args):
    """Images/s and latency of 50 DDIM steps with guidance 6, text encoding and decoding included."""
    import jax

    pipe = _txt2img_pipeline(args, _dtype(args.dtype))
    _note("pipeline ready; compiling and timing")
    prompts = ["a red circle at the top left"] * batch
    rng = jax.random.key(0)
    seconds = _median_time(lambda: pipe(prompts, rng=rng, num_inference_steps=args.steps, guidance_scale=6.0),
                           args.warmup, args.reps)
    return dict(batch=batch, steps=args.steps, total_s=round(seconds, 4), img_per_s=round(batch / seconds, 2))


def sample_loop_case(batch, args):
    """The peer's sampling work: the txt2img UNet's 50 DDIM steps with guidance 6 from a given
    context (2 x batch rows, unconditional first), one jitted program returning the latents."""
    import jax

    from latentdiff.diffusion import samplers
    from latentdiff.pipeline import guided_model_fn
    from latentdiff.runtime import COMPILER_OPTIONS

    dtype = _dtype(args.dtype)
    spec = _txt2img_spec(args.smoke, dtype)
    unet = spec["unet"]
    params = jax.device_put(_random_params(args.smoke, dtype)["unet"], jax.devices()[0])  # the UNet's alone
    hw = spec["config"].latent_size
    keys = jax.random.split(jax.random.key(0), 2)
    ctx = jax.random.normal(keys[0], (2 * batch, 77, unet.config.context_dim)).astype(dtype)
    x_T = jax.random.normal(keys[1], (batch, hw, hw, unet.config.in_channels))

    @functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
    def loop(params, ctx, x_T):
        model_fn = guided_model_fn(unet, params, ctx, 6.0)
        return samplers.sample(model_fn, x_T, spec["schedule"], sampler="ddim", num_steps=args.steps)

    _note("compiling and timing")
    compiled = loop.lower(params, ctx, x_T).compile()
    seconds = _median_time(lambda: jax.block_until_ready(compiled(params, ctx, x_T)), args.warmup, args.reps)
    return dict(batch=batch, steps=args.steps, total_s=round(seconds, 4), img_per_s=round(batch / seconds, 2),
                xla_memory=xla_memory(compiled))


def _rel_err(a, b):
    """||a - b|| / ||b|| in float64."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _precision(dtype_name):
    """The matmul precision of a bf16 check's run: the float32 reference in true float32 (GPUs
    compute float32 matmuls and convolutions in TF32 by default), bf16 as it runs."""
    import jax

    return jax.default_matmul_precision("highest" if dtype_name == "float32" else "default")


def bf16_check_case(args):
    """Relative error of bf16 against fp32 on the same inputs and weights."""
    import jax
    import jax.numpy as jnp

    p32 = _txt2img_pipeline(argparse.Namespace(**{**vars(args), "param_dtype": "float32"}), jnp.float32)
    pipes = {"float32": p32, "bfloat16": _txt2img_pipeline(args, jnp.bfloat16, params=p32.params)}  # one copy
    unet_params = p32.params["unet"]
    size = p32.config.latent_size
    k = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(k[0], (4, size, size, 4))
    t = jnp.array([10, 250, 500, 900])
    ctx = jax.random.normal(k[1], (4, 77, p32.unet.config.context_dim))
    outs, images = {}, {}
    for d, p in pipes.items():
        with _precision(d):
            outs[d] = jax.jit(p.unet.apply)({"params": unet_params}, x, t, ctx).astype(jnp.float32)
            images[d] = p(["a red circle at the top left"], rng=k[2], num_inference_steps=args.steps,
                          guidance_scale=6.0, output_type="float")
    return dict(unet_rel_err=_rel_err(outs["bfloat16"], outs["float32"]),
                image_rel_err=_rel_err(images["bfloat16"], images["float32"]))


# The GEGLU projections of the txt2img UNet's guided sampling loop at batch 16: rows, input width, output width.
GEGLU_SHAPES = ((32768, 320, 1280), (8192, 640, 2560), (2048, 1280, 5120), (512, 1280, 5120))


def kernel_check_case(args):
    """Our GPU kernels against XLA on the same inputs: GEGLU's projection and gate in one kernel
    (`models/geglu_gemm.py`) against XLA's GEMM and gate, at the txt2img UNet's shapes in bf16: the
    largest difference over the largest value, and microseconds of each. Smoke: one small shape in
    Pallas' GPU interpreter (no time)."""
    import jax
    import jax.numpy as jnp

    from latentdiff.models import geglu_gemm

    if not args.smoke and not geglu_gemm.hopper_gpu(jax.devices()[0]):
        return dict(skipped="the kernels are for Hopper GPUs")
    kernel = geglu_gemm.geglu_matmul
    shapes = GEGLU_SHAPES
    if args.smoke:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        kernel, shapes = functools.partial(kernel, sms=2, interpret=InterpretGPUParams()), ((256, 64, 128),)
    rows = []
    for m, k, i in shapes:
        keys = jax.random.split(jax.random.key(m), 3)
        x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
        w = (jax.random.normal(keys[1], (k, 2 * i)) / k ** 0.5).astype(jnp.bfloat16)
        b = jax.random.normal(keys[2], (2 * i,)).astype(jnp.bfloat16)
        tiles = geglu_gemm.tiles_for(m)
        programs = {"xla": jax.jit(lambda x, w, b: geglu_gemm._xla_path(x, w, b, jnp.bfloat16)),
                    "kernel": jax.jit(lambda x, w, b: kernel(x, w, b, tiles))}
        outs = {name: f(x, w, b).astype(jnp.float32) for name, f in programs.items()}
        row = dict(shape=[m, k, i], rel_err=float(jnp.max(jnp.abs(outs["kernel"] - outs["xla"]))
                                                  / jnp.max(jnp.abs(outs["xla"]))))
        if not args.smoke:
            for name, f in programs.items():
                row[f"{name}_us"] = round(1e6 * _median_time(lambda: f(x, w, b).block_until_ready(),
                                                             args.warmup, max(args.reps, 20)), 1)
        rows.append(row)
    return dict(geglu=rows, max_rel_err=max(r["rel_err"] for r in rows))


# The txt2img UNet as diffusers builds it (the peer's model); smoke: two small levels.
TXT2IMG_DIFFUSERS = dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                         down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                         up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                         layers_per_block=2, attention_head_dim=8, cross_attention_dim=1280)
SMOKE_DIFFUSERS = dict(TXT2IMG_DIFFUSERS, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                       norm_num_groups=8)


def bf16_vs_torch_case(args):
    """bf16 against fp32 (true fp32: no TF32) for our UNet and diffusers' under torch autocast, on
    the same weights (diffusers' random init plus N(0, 0.02^2), converted) and the same inputs."""
    import diffusers
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from latentdiff.convert import loaders
    from latentdiff.convert.torch_names import convert_state_dict
    from latentdiff.models.unet import UNet, UNetConfig

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    size = 8 if args.smoke else 32
    torch.manual_seed(0)
    tm = diffusers.UNet2DConditionModel(sample_size=size, **(SMOKE_DIFFUSERS if args.smoke else TXT2IMG_DIFFUSERS))
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tm = tm.eval().to(dev)
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, size, size, 4), dtype=np.float32)
    t = np.array([10, 250, 500, 900])
    ctx = rng.standard_normal((4, 77, cfg.context_dim), dtype=np.float32)
    sd = {k: v.detach().float().cpu().numpy() for k, v in tm.state_dict().items()}
    params = convert_state_dict(sd, loaders.abstract_params(UNet(cfg), x, t, ctx))
    del sd

    theirs = {}
    with torch.no_grad():
        inputs = (torch.from_numpy(x.transpose(0, 3, 1, 2)).to(dev), torch.from_numpy(t).to(dev),
                  torch.from_numpy(ctx).to(dev))
        theirs["float32"] = tm(*inputs[:2], encoder_hidden_states=inputs[2]).sample.cpu().numpy()
        with torch.autocast(dev, dtype=torch.bfloat16):
            theirs["bfloat16"] = tm(*inputs[:2], encoder_hidden_states=inputs[2]).sample.float().cpu().numpy()
    del tm
    ours = {}
    for d in ("float32", "bfloat16"):
        with _precision(d):
            out = jax.jit(UNet(cfg, dtype=_dtype(d)).apply)({"params": params}, x, t, ctx)
        ours[d] = np.asarray(out.astype(jnp.float32)).transpose(0, 3, 1, 2)
    return dict(ours_rel_err=_rel_err(ours["bfloat16"], ours["float32"]),
                torch_autocast_rel_err=_rel_err(theirs["bfloat16"], theirs["float32"]),
                fp32_ours_vs_torch=_rel_err(ours["float32"], theirs["float32"]), torch=torch.__version__)


def peer_case(which, args):
    """The PyTorch peer, eager and compiled, with torch's peak memory: the reference peer_torch.py
    (`--peer`) for the txt2img UNet, `peer_models.py` (beside this file) for cin256-v2 and KL-f8."""
    import io
    import contextlib

    import torch

    if which in OWN_PEERS:
        import peer_models

        bench_fn, model, batch, _ = OWN_PEERS[which]
        if args.smoke:
            model, batch = model + "_smoke", 2

        def run(compiled):
            getattr(peer_models, bench_fn)(model, batch, compiled)
    else:
        spec = importlib.util.spec_from_file_location("peer_torch", args.peer)
        peer = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(peer)

        def run(compiled):
            if which == "peer_train":
                peer.bench_train(64, compiled)
            else:
                peer.bench_sample(1 if which == "peer_sample_b1" else 16, compiled)
    rows, gpu = [], torch.cuda.is_available()
    for compiled in (False, True):
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run(compiled)
        row = json.loads(out.getvalue().strip().splitlines()[-1])
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if gpu else None
        rows.append(row)
    return dict(eager=rows[0], compiled=rows[1], torch=torch.__version__)


def run_case(name, args):
    import jax

    if name in PEER_CASES:
        return peer_case(name, args)
    _PROFILE.clear()
    if args.profile:
        _PROFILE["dir"] = os.path.join(args.profile, name)
    if name == "train_txt2img":
        out = train_ldm_case("txt2img_1p4b", 2 if args.smoke else 64, args)
    elif name == "train_txt2img_no_ema":
        out = train_ldm_case("txt2img_1p4b", 2 if args.smoke else 64, args, use_ema=False)
    elif name == "train_cin256":  # the released config keeps no EMA (use_ema: False): the peer's work
        out = train_ldm_case("cin256_v2", 2 if args.smoke else 64, args, use_ema=False)
    elif name == "train_kl_f8":
        out = train_autoencoder_case(2 if args.smoke else 8, args)
    elif name.startswith("sample_b"):
        out = sample_case(int(name[len("sample_b"):]), args)
    elif name.startswith("sample_loop_b"):
        out = sample_loop_case(int(name[len("sample_loop_b"):]), args)
    elif name == "bf16_check":
        out = bf16_check_case(args)
    elif name == "bf16_vs_torch":
        out = bf16_vs_torch_case(args)
    elif name == "kernel_check":
        out = kernel_check_case(args)
    else:
        raise SystemExit(f"unknown case {name!r}; one of {CASES + TORCH_CASES + PEER_CASES}")
    out["peak_mem_gib"] = _peak_memory_gib()
    if "summary" in _PROFILE:
        out["profile"] = _PROFILE["summary"]
    out.update(device=jax.devices()[0].device_kind, jax=jax.__version__, dtype=args.dtype)
    return out


def table(rows):
    """Markdown: one line per case, with the peer's compiled figure and the ratio where there is one."""
    peer = {r["case"]: r for r in rows if r["case"] in PEER_CASES and "error" not in r}
    match = {"train_txt2img": ("peer_train", "img_per_s"), "train_txt2img_no_ema": ("peer_train", "img_per_s"),
             "sample_b16": ("peer_sample_b16", "img_per_s"), "sample_loop_b16": ("peer_sample_b16", "img_per_s"),
             "sample_b1": ("peer_sample_b1", "total_s"), "sample_loop_b1": ("peer_sample_b1", "total_s")}
    match.update({ours: (peer, "img_per_s") for peer, (*_, ours) in OWN_PEERS.items()})
    lines = ["| case | ours | peak GiB | MFU | peer eager | peer compiled | peer GiB | ours / compiled |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["case"] in PEER_CASES:
            continue
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error']} |  |  |  |  |  |  |")
            continue
        if r["case"] == "bf16_check":
            lines.append(f"| bf16_check | UNet rel err {r['unet_rel_err']:.2e}, image rel err "
                         f"{r['image_rel_err']:.2e} |  |  |  |  |  |  |")
            continue
        if r["case"] == "kernel_check" and "skipped" in r:
            lines.append(f"| kernel_check | skipped: {r['skipped']} |  |  |  |  |  |  |")
            continue
        if r["case"] == "kernel_check":
            times = ", ".join(f"{g['kernel_us']} / {g['xla_us']}" for g in r["geglu"] if "kernel_us" in g)
            lines.append(f"| kernel_check | GEGLU kernel against XLA: max rel diff {r['max_rel_err']:.1e}"
                         + (f"; us {times}" if times else "") + " |  |  |  |  |  |  |")
            continue
        if r["case"] == "bf16_vs_torch":
            lines.append(f"| bf16_vs_torch | UNet rel err {r['ours_rel_err']:.2e} (fp32 vs torch "
                         f"{r['fp32_ours_vs_torch']:.1e}) |  |  | autocast {r['torch_autocast_rel_err']:.2e} |  |  |  |")
            continue
        peer_case, key = match.get(r["case"], ("", "img_per_s"))
        unit = " s" if key == "total_s" else " img/s"
        peak = str(r.get("peak_mem_gib")) + (f" (first run {r['first_peak_gib']})" if "first_peak_gib" in r else "")
        cells = [f"{r[key]}{unit}", peak, str(r.get("mfu", ""))]
        p = peer.get(peer_case)
        if p:
            e, c = p["eager"], p["compiled"]
            ratio = c[key] / r[key] if key == "total_s" else r[key] / c[key]
            cells += [f"{e[key]}{unit}", f"{c[key]}{unit}", str(c["peak_mem_gib"]), f"{ratio:.2f}x"]
        else:
            cells += ["", "", "", ""]
        lines.append(f"| {r['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _one(case, args):
    """Run one case in a child process and return its JSON row (or an error row)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", case] + args,
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"case"')]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    sys.stderr.write(f"--- {case}: the child's stderr, last 6000 characters ---\n{proc.stderr[-6000:]}\n")
    return {"case": case, "error": exception_line(proc.stderr)[:200]}


def exception_line(stderr):
    """The line of a traceback that names the exception (JAX writes a note on its filtered frames
    after it; a process killed without a traceback gives its last line)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", line)]
    return (named or lines or ["no output"])[-1]


def _subprocess_row(case, passthrough):
    """One case in its own process, so that its peak memory is its own.

    Our timed cases run twice: first a --warm process compiles the program (XLA autotunes its
    convolutions and GEMMs, in scratch buffers that count in the device's peak) and runs it once,
    filling the compile cache; then the measured process loads the program from the cache, so its
    peak is the program's own, as on every run after a machine's first. The warm process's peak is
    reported beside it as `first_peak_gib`."""
    warm = None
    if case.startswith(("train_", "sample_")) and os.environ.get("LATENTDIFF_COMPILE_CACHE") != "off":
        warm = _one(case, passthrough + ["--warm"])
        if "error" in warm:
            return warm
    row = _one(case, passthrough)
    if warm is not None and "error" not in row:
        row["first_peak_gib"] = warm["first_peak_gib"]
    return row


def _smoke_row(case, args):
    """Smoke mode runs every case in this process (no memory to measure on the CPU; the random
    weights are made once)."""
    try:
        return {"case": case, **run_case(case, args)}
    except (Exception, SystemExit) as e:  # a broken case is a row, as in a subprocess
        return {"case": case, "error": f"{type(e).__name__}: {e}"[:200]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="", help=f"comma-separated, of {CASES + TORCH_CASES + PEER_CASES}; "
                    "default: all of ours, and with --peer also the peer's and bf16_vs_torch")
    ap.add_argument("--peer", default="", help="path of the diffusers peer script (peer_torch.py); with "
                    "--cases, only the cases named run")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU, 1 repeat")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute dtype")
    ap.add_argument("--param_dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="sampling weights (training keeps fp32 master weights)")
    ap.add_argument("--remat", action="store_true", help="activation checkpointing in the UNet")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak for MFU")
    ap.add_argument("--out", default="", help="append the JSON lines here")
    ap.add_argument("--profile", default="", help="trace one timed call per case under this directory "
                    "and add its kernel times by kind to the row (benchmarks/kernel_profile.py)")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one case here
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)  # internal: --one compiles and runs once
    args = ap.parse_args(argv)
    if args.smoke:
        args.warmup, args.reps, args.steps = 1, 1, 5  # every case end to end once; compiling dominates
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.one:
        from latentdiff.runtime import enable_compile_cache

        enable_compile_cache()  # a re-run skips compiling and autotuning (compile times are not measured)
        if args.warm:
            _WARM["on"] = True
            try:
                run_case(args.one, args)
            except _Warmed:
                print(json.dumps({"case": args.one, "first_peak_gib": _peak_memory_gib()}), flush=True)
                return 0
            raise SystemExit(f"{args.one} ran no timed call to warm")
        print(json.dumps({"case": args.one, **run_case(args.one, args)}), flush=True)
        return 0
    cases = [c for c in args.cases.split(",") if c]
    if not cases:  # all of ours, and with --peer the peer's
        cases = list(CASES) + (list(TORCH_CASES + PEER_CASES) if args.peer else [])
    rows = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith(("--cases", "--out"))]
    for case in cases:
        row = _smoke_row(case, args) if args.smoke else _subprocess_row(case, passthrough)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
