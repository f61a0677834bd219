"""Test setup: CPU only, full float32 precision, small thread counts (CI has 2 cores)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models on a CPU: compiling dominates. LLVM at -O1 without its expensive passes compiles about
# as fast as -O0 (JAX_DISABLE_MOST_OPTIMIZATIONS) yet runs loops at full speed: at -O0 a lax.scan
# over the UNet (every sampler) runs ~100x slower. Set before jax starts its backend; the programs
# that tests start in subprocesses inherit it (tests/train_utils.py adds device counts to it).
XLA_TEST_FLAGS = "--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"
if XLA_TEST_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_TEST_FLAGS}".strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
