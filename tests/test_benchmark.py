"""The GPU benchmark's smoke mode (tiny models, CPU), so the script never rots, and the bf16 gate."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_smoke_runs_every_case(tmp_path):
    out = tmp_path / "bench.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--smoke",
                           f"--out={out}", f"--profile={tmp_path / 'prof'}"], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["case"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"train_txt2img", "train_txt2img_no_ema", "train_cin256", "train_kl_f8", "sample_b1",
                         "sample_b16", "sample_b64", "sample_loop_b1", "sample_loop_b16", "bf16_check",
                         "kernel_check"}
    for case in ("train_txt2img", "train_txt2img_no_ema", "train_cin256", "train_kl_f8"):
        assert rows[case]["img_per_s"] > 0 and rows[case]["step_s"] > 0
        assert rows[case]["tflops_per_s"] > 0  # XLA's cost analysis of the compiled step
    assert rows["train_cin256"]["params_M"] > 0
    assert rows["train_txt2img"]["xla_memory"]["args_gib"] > 0  # XLA's analysis of the step
    for b in (1, 16, 64):
        assert rows[f"sample_b{b}"]["batch"] == b and rows[f"sample_b{b}"]["img_per_s"] > 0
    loop = rows["sample_loop_b16"]
    assert loop["batch"] == 16 and loop["total_s"] > 0 and rows["sample_loop_b1"]["batch"] == 1
    # the loop's arguments are the UNet's weights (bf16 here), the context and the noise: no other model's
    unet_gib = rows["train_txt2img"]["params_M"] * 1e6 * 2 / 2 ** 30
    assert unet_gib <= loop["xla_memory"]["args_gib"] * 1.05 and loop["xla_memory"]["args_gib"] < 1.5 * unet_gib
    # the peer's work: the same step without the EMA holds one fp32 copy of the UNet less
    ema_floats = (rows["train_txt2img"]["xla_memory"]["args_gib"]
                  - rows["train_txt2img_no_ema"]["xla_memory"]["args_gib"]) * 2 ** 30 / 4
    params = rows["train_txt2img"]["params_M"] * 1e6
    assert abs(ema_floats - params) < 0.05 * params  # GiB are rounded to 4 places
    # bf16 compute with fp32 weights stays within 1e-2 of fp32 on the same inputs
    assert rows["bf16_check"]["unet_rel_err"] < 1e-2
    assert rows["bf16_check"]["image_rel_err"] < 1e-2
    assert "| train_txt2img |" in proc.stdout and "| bf16_check |" in proc.stdout
    # the GEGLU kernel (Pallas' GPU interpreter here) against XLA's GEMM and gate: bf16 rounding apart
    assert 0 < rows["kernel_check"]["max_rel_err"] < 1e-2 and "| kernel_check |" in proc.stdout
    # --profile traced one timed call of each timed case (the CPU has no device kernels to count)
    for case in ("train_txt2img", "train_kl_f8", "sample_b1"):
        assert rows[case]["profile"]["kernels"] == 0
        assert list((tmp_path / "prof" / case).rglob("*.trace.json.gz"))


def test_bf16_error_no_worse_than_torch_autocast_on_the_same_weights():
    """bench's bf16_vs_torch (smoke size): the UNets agree in fp32, and our bf16 error against fp32
    is at most torch autocast's (+25%) on the same weights and inputs."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--smoke",
                           "--cases=bf16_vs_torch"], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert row["fp32_ours_vs_torch"] < 1e-5
    assert 0 < row["ours_rel_err"] < 1.25 * row["torch_autocast_rel_err"]


def test_kernel_profile_sums_device_kernels_by_kind(tmp_path):
    """A trace as jax.profiler writes it: device kernels summed by kind, busy time without overlaps."""
    import gzip

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import kernel_profile

    meta = [dict(ph="M", name="process_name", pid=1, args=dict(name="/device:GPU:0")),
            dict(ph="M", name="process_name", pid=2, args=dict(name="/host:CPU"))]
    kernels = [("sm90_xmma_fprop_implicit_gemm_bf16", 0, 100), ("nvjet_sm90_tst_128x128", 50, 100),
               ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 300, 40), ("input_reduce_fusion_3", 400, 10),
               ("loop_multiply_fusion_28", 410, 30), ("loop_multiply_fusion_28", 500, 30), ("loop_add_fusion", 530, 2)]
    events = meta + [dict(ph="X", pid=1, tid=7, name=n, ts=t, dur=d) for n, t, d in kernels]
    events.append(dict(ph="X", pid=2, tid=1, name="PjitFunction", ts=0, dur=5000))  # host: not counted
    path = tmp_path / "x.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    got = kernel_profile.summarize(str(path), top=2)
    assert got["kernels"] == 7 and got["kernel_ms"] == 0.312 and got["small"] == dict(kernels=1, ms=0.002)
    assert got["busy_ms"] == 0.262 and got["window_ms"] == 0.532  # 0-150 overlapped, 300-340, 400-440, 500-532
    assert got["by_kind"] == {"convolution": 0.1, "matmul": 0.1, "elementwise/other": 0.062, "attention": 0.04,
                              "reduction": 0.01}
    assert got["top"][0] == dict(name="sm90_xmma_fprop_implicit_gemm_bf16", ms=0.1, calls=1)


def test_benchmark_reports_a_failing_case(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--smoke",
                           "--cases=no_such_case"], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 1
    assert "unknown case 'no_such_case'" in proc.stdout


def test_failing_child_row_names_the_exception_not_jax_note():
    """A JAX error's traceback ends with JAX's note on its filtered frames: the row keeps the exception."""
    proc = subprocess.run([sys.executable, "-c", "import jax, jax.numpy as jnp\n"
                           "jax.jit(lambda x: x.reshape(3))(jnp.ones(2))"], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench
    assert proc.returncode == 1 and "For simplicity" in proc.stderr.strip().splitlines()[-1]
    assert bench.exception_line(proc.stderr).startswith("TypeError: cannot reshape array of shape (2,)")
    assert bench.exception_line("Killed\n") == "Killed"


def test_scaling_smoke_on_two_fake_devices():
    rows = {}
    for what, extra in (("dp", ["--variants=fsdp"]), ("fsdp", ["--time"]), ("sample", [])):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "scaling.py"), what, "--smoke",
                               "--reps=1", *extra], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[what] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    (memory,) = [r for r in rows["dp"] if r["what"] == "dp_memory"]
    (timed,) = [r for r in rows["dp"] if r["what"] == "dp_scaling"]
    assert timed["variant"] == "fsdp" and timed["devices"] == 2
    assert timed["one_img_per_s"] > 0 and timed["all_img_per_s"] > 0
    assert memory["all"]["args_gib"] < memory["one"]["args_gib"]  # the state split over 2 devices
    by_mesh = {r["mesh"]: r for r in rows["fsdp"]}
    # parameters, EMA and optimizer state sharded over 2 devices take less memory per device
    assert by_mesh["data=1 fsdp=2"]["args_gib"] < by_mesh["data=2 fsdp=1"]["args_gib"]
    assert all(r["step_s"] > 0 and r["img_per_s"] > 0 for r in by_mesh.values())  # --time: both steps ran
    (sample,) = rows["sample"]
    assert sample["devices"] == 2 and sample["one_img_per_s"] > 0 and sample["all_img_per_s"] > 0


def test_named_cases_run_alone_even_with_the_peer_given(tmp_path):
    """`--cases=... --peer=...` runs the cases named, not every peer case too (a device call has a
    time limit: the peer's cases and bf16_vs_torch take minutes)."""
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--smoke",
                           "--cases=sample_b1", f"--peer={tmp_path / 'no_peer.py'}", f"--out={out}"],
                          capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line)["case"] for line in out.read_text().splitlines()] == ["sample_b1"]


def test_cin256_peer_is_the_configs_unet_and_trains(capsys):
    """`peer_models.py`'s cin256-v2 UNet in diffusers is the released config's UNet (its diffusers
    config read back, its parameter count, latent size and context), and its step runs (CPU, eager)."""
    import dataclasses
    import importlib

    import jax
    import pytest

    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from latentdiff.models.unet import UNet, UNetConfig
    from latentdiff.training.loop import compvis_params
    from tests.torch_utils import peer_models

    cfg = importlib.import_module("configs.cin256_v2").get_config().model
    ours = UNetConfig.from_compvis(compvis_params(cfg)["unet_config"]["params"])
    with torch.device("meta"):
        model, size, context = peer_models().build_unet("cin256")
    theirs = UNetConfig.from_diffusers(dict(model.config))
    assert dataclasses.replace(theirs, attention_resolutions=ours.attention_resolutions) == ours
    assert sorted(theirs.attention_resolutions) == sorted(ours.attention_resolutions)
    assert (size, context) == (cfg.image_size, (1, cfg.cond_stage_config.params["embed_dim"]))
    x, t, ctx = jax.ShapeDtypeStruct((1, size, size, 3), "float32"), jax.ShapeDtypeStruct((1,), "int32"), \
        jax.ShapeDtypeStruct((1, *context), "float32")
    shapes = jax.eval_shape(lambda *a: UNet(ours).init(jax.random.key(0), *a), x, t, ctx)["params"]
    assert sum(p.numel() for p in model.parameters()) == sum(a.size for a in jax.tree.leaves(shapes))

    peer_models().bench_train("cin256_smoke", 2, False, warmup=1, reps=2)
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["what"] == "train_step_cin256_smoke" and row["img_per_s"] > 0 and not row["compile"]


def test_autoencoder_peer_is_the_configs_and_trains(capsys):
    """The KL-f8 peer: diffusers' AutoencoderKL is `configs/kl_f8.py`'s autoencoder (config read back,
    parameter count), its LPIPS and discriminator have ours' parameter counts, and its two-update step
    runs (CPU, eager, smoke size)."""
    import importlib

    import jax
    import pytest

    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from latentdiff.losses.discriminator import NLayerDiscriminator
    from latentdiff.losses.lpips import lpips_abstract_params
    from latentdiff.models.autoencoder import AutoencoderConfig
    from latentdiff.training.autoencoder_loop import build_autoencoder
    from tests.torch_utils import peer_models

    cfg = importlib.import_module("configs.kl_f8").get_config().model
    ours = build_autoencoder(cfg)
    with torch.device("meta"):
        vae, size = peer_models().build_autoencoder("kl_f8")
        lpips, disc = peer_models().TorchLPIPS(), peer_models().torch_discriminator(n_layers=cfg.loss.disc_num_layers)
    assert AutoencoderConfig.from_diffusers(dict(vae.config), kind="kl") == ours.config
    assert size == cfg.ddconfig.resolution
    image = jax.ShapeDtypeStruct((1, size, size, 3), "float32")

    def count(tree):
        return sum(a.size for a in jax.tree.leaves(tree))

    def torch_count(module, skip=""):
        return sum(p.numel() for n, p in module.named_parameters() if not (skip and n.startswith(skip)))

    assert torch_count(vae) == count(jax.eval_shape(lambda a: ours.init(jax.random.key(0), a), image))
    assert torch_count(lpips, skip="net.classifier") == count(lpips_abstract_params())
    disc_vars = jax.eval_shape(lambda a: NLayerDiscriminator(n_layers=cfg.loss.disc_num_layers).init(
        jax.random.key(0), a, train=False), image)
    assert torch_count(disc) == count(disc_vars["params"])

    peer_models().bench_train_autoencoder("kl_f8_smoke", 2, False, warmup=1, reps=2)
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["what"] == "train_step_kl_f8_smoke" and row["img_per_s"] > 0


def test_timed_case_runs_after_a_process_that_compiled_it(tmp_path, monkeypatch):
    """The driver's two processes for a timed case: a --warm one that compiles the program into the
    compile cache, runs it once and reports its peak, then the measured one, which loads the program
    from the cache (so its peak is the program's, not XLA's autotuning scratch)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench

    cache = tmp_path / "cache"
    monkeypatch.setenv("LATENTDIFF_COMPILE_CACHE", str(cache))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the tiny program compiles fast
    warm = bench._one("sample_loop_b1", ["--smoke", "--warm"])
    assert set(warm) == {"case", "first_peak_gib"}, warm  # stopped at its first timed call
    cached = sorted(p.name for p in cache.iterdir())
    assert cached  # the program is in the cache for the measured process
    row = bench._subprocess_row("sample_loop_b1", ["--smoke"])
    assert row["total_s"] > 0 and row["batch"] == 1 and "first_peak_gib" in row
    # the measured processes compiled nothing new: every program they ran came from the cache
    assert sorted(p.name for p in cache.iterdir()) == cached
    assert "sample_loop_b1" in bench.table([row])
