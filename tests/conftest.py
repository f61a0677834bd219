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


# ---------------------------------------------------------------- spreading the suite over xdist workers
# pytest.ini runs `--dist loadgroup --no-loadscope-reorder`: a module whose module-scoped fixture is
# expensive (a training run, converted reference models) stays on one worker, so the fixture is
# built once; every other test is its own unit. Units are handed out longest first (seconds below,
# measured on a 2-core CI machine; anything not listed counts as short and keeps its file order),
# so that the run does not end with one worker alone on a long test.
GROUPED_MODULES = ("test_demo.py", "test_train_autoencoder.py", "test_pipeline_tasks.py",
                   "test_pipeline_diffusers.py", "test_pipeline_compvis.py", "test_autoencoder.py",
                   "test_losses.py", "test_text.py")
EXPECTED_SECONDS = {
    "test_demo.py": 630,
    "test_benchmark.py::test_benchmark_smoke_runs_every_case": 390,
    "test_multiprocess.py": 350,
    "test_benchmark.py::test_scaling_smoke_on_two_fake_devices": 155,
    "test_train_autoencoder.py": 140,
    "test_pipeline_tasks.py": 130,
    "test_train_ldm.py::test_eight_devices_data_by_fsdp_match_one_device": 110,
    "test_pipeline_diffusers.py": 90,
    "test_train_ldm.py::test_sigkill_then_resume_gives_the_same_losses": 80,
    "test_train_ldm.py::test_cached_latents_train_and_resume": 55,
    "test_benchmark.py::test_bf16_error_no_worse_than_torch_autocast_on_the_same_weights": 25,
    "test_ldm_step.py::test_a_non_finite_step_changes_nothing_but_the_step": 55,
    "test_train_ldm.py::test_train_then_sample": 50,
    "test_ldm_step.py::test_a_finite_step_updates_params_ema_and_optimizer": 50,
    "test_autoencoder.py": 45,
    "test_train_ldm.py::test_nan_loss_stops_and_keeps_the_last_good_checkpoint": 40,
    "test_train_ldm.py::test_corrupt_newest_checkpoint_falls_back_with_a_warning": 40,
    "test_losses.py": 30,
    "test_pipeline_compvis.py": 30,
    "test_train_ldm.py::test_sigterm_saves_before_exiting": 20,
    "test_text.py": 10,
}


def _unit(item):
    """(the scheduling unit of a test: its module when grouped, else itself; that unit's seconds)."""
    module = os.path.basename(str(item.path))
    if module in GROUPED_MODULES:
        return module, EXPECTED_SECONDS.get(module, 0)
    name = f"{module}::{item.originalname}"
    return name, EXPECTED_SECONDS.get(name, EXPECTED_SECONDS.get(module, 0))


def _tryfirst(hook):  # before xdist's own hook, which reads the xdist_group marks
    import pytest

    return pytest.hookimpl(tryfirst=True)(hook)


@_tryfirst
def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        unit, _ = _unit(item)
        if unit.endswith(".py"):
            item.add_marker(pytest.mark.xdist_group(unit[:-len(".py")]))
    first = {}
    for i, item in enumerate(items):
        first.setdefault(_unit(item)[0], i)
    # longest units first; a unit's tests stay together and in file order; short tests keep theirs
    items.sort(key=lambda item: (-_unit(item)[1], first[_unit(item)[0]]))
