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
                           f"--out={out}"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["case"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"train_txt2img", "train_cin256", "train_kl_f8", "sample_b1", "sample_b16",
                         "sample_b64", "bf16_check"}
    for case in ("train_txt2img", "train_cin256", "train_kl_f8"):
        assert rows[case]["img_per_s"] > 0 and rows[case]["step_s"] > 0
        assert rows[case]["tflops_per_s"] > 0  # XLA's cost analysis of the compiled step
    assert rows["train_cin256"]["params_M"] > 0
    for b in (1, 16, 64):
        assert rows[f"sample_b{b}"]["batch"] == b and rows[f"sample_b{b}"]["img_per_s"] > 0
    # bf16 compute with fp32 weights stays within 1e-2 of fp32 on the same inputs
    assert rows["bf16_check"]["unet_rel_err"] < 1e-2
    assert rows["bf16_check"]["image_rel_err"] < 1e-2
    assert "| train_txt2img |" in proc.stdout and "| bf16_check |" in proc.stdout


def test_benchmark_reports_a_failing_case(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--smoke",
                           "--cases=no_such_case"], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 1
    assert "unknown case 'no_such_case'" in proc.stdout


def test_scaling_smoke_on_two_fake_devices():
    rows = {}
    for what, extra in (("dp", ["--variants=fsdp"]), ("fsdp", []), ("sample", [])):
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
    (sample,) = rows["sample"]
    assert sample["devices"] == 2 and sample["one_img_per_s"] > 0 and sample["all_img_per_s"] > 0