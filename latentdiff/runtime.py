"""Process-wide JAX settings that the command-line programs apply before they compile anything."""
import os

import jax
import jax.numpy as jnp

DEFAULT_CACHE = os.path.join("~", ".cache", "latentdiff", "xla")

# XLA options of the training steps and the sampling programs (`jax.jit(..., compiler_options=)`).
# The dot merger joins GEMMs that share an operand (a self-attention's q/k/v) into one GEMM whose
# inputs are concatenated and whose output is sliced, copies that cost more than they save here.
# Off, on an H200 (BENCHMARKS.md, session 10): the txt2img train step at batch 64 waited for
# 0.1164 -> 0.1096 s, back to back 619.7 -> 626.5 img/s, same memory; its 50-step sampling loop at
# batch 16 0.763 -> 0.750 s, 2.17 -> 1.98 GiB. Other backends ignore these options.
COMPILER_OPTIONS = {"xla_gpu_dot_merger_threshold_mb": 0}

# The dtypes a config or a command line names (`dtype`, `param_dtype`).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def enable_compile_cache(path=None):
    """Keep compiled programs and XLA's autotuning results on disk, so that a second run of the same
    config (a resume, a sweep, the sampler) skips minutes of compiling and autotuning.

    `path` defaults to JAX's own setting ($JAX_COMPILATION_CACHE_DIR) when there is one, else
    $LATENTDIFF_COMPILE_CACHE, else ~/.cache/latentdiff/xla; "off" disables it.
    Returns the directory used, or None.
    """
    if path is None and jax.config.jax_compilation_cache_dir:  # JAX's own setting wins
        return jax.config.jax_compilation_cache_dir
    path = os.environ.get("LATENTDIFF_COMPILE_CACHE", DEFAULT_CACHE) if path is None else path
    if not path or path == "off":
        return None
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def _cluster_detected():
    """Whether the environment is a multi-process job that JAX's own detectors can join: SLURM with
    several tasks, Open MPI with several ranks, or a multi-host Cloud TPU slice."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(cfg=None):
    """Start JAX's multi-process runtime when the config or the environment asks for it; call it
    before anything touches a device. Returns (process_index, process_count).

    `cfg` is a config's `distributed` section: `coordinator_address` ("host:port" of process 0),
    `num_processes`, `process_id` (both also from $LATENTDIFF_NUM_PROCESSES / $LATENTDIFF_PROCESS_ID
    and the address from $LATENTDIFF_COORDINATOR), and `mode`: "auto" (start when an address is given
    or a SLURM / Open MPI / TPU-pod job is detected), "on" (always: JAX detects the cluster) or "off".
    Multi-process CPU runs (tests) use gloo collectives.
    """
    cfg = dict(cfg or {})
    mode = cfg.get("mode", "auto")
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed.mode must be 'auto', 'on' or 'off', not {mode!r}")
    address = cfg.get("coordinator_address") or os.environ.get("LATENTDIFF_COORDINATOR", "")
    num = int(cfg.get("num_processes") or os.environ.get("LATENTDIFF_NUM_PROCESSES", 0) or 0)
    pid = cfg.get("process_id", -1)
    pid = int(os.environ.get("LATENTDIFF_PROCESS_ID", -1) if pid is None or pid < 0 else pid)
    if mode == "off" or (mode == "auto" and not address and not _cluster_detected()):
        return 0, 1
    if address and (num < 1 or not 0 <= pid < num):
        raise ValueError(f"distributed.coordinator_address={address!r} needs distributed.num_processes "
                         f"(got {num}) and distributed.process_id in [0, num_processes) (got {pid})")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(coordinator_address=address, num_processes=num, process_id=pid) if address else {}
    jax.distributed.initialize(**kwargs)
    return jax.process_index(), jax.process_count()
