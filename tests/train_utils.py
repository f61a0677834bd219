"""Helpers for end-to-end training tests: small image folders and running train.py."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image_folder(path, classes=("red", "green", "blue"), per_class=8, size=20, seed=0):
    """Class sub-folders of simple coloured images with a darker random block."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(path, name), exist_ok=True)
        for i in range(per_class):
            a = np.full((size, size, 3), 30, np.uint8)
            a[..., c % 3] = 220
            y, x = rng.randint(0, size // 2, 2)
            a[y:y + size // 2, x:x + size // 2] //= 3
            Image.fromarray(a).save(os.path.join(path, name, f"{i}.png"))
    return path


def train(config, workdir, *overrides, devices=None, check=True, **popen):
    """Run `python train.py` in a subprocess; returns the CompletedProcess (or Popen with background=True)."""
    return run_program("train.py", f"--config={os.path.join(ROOT, config)}", f"--workdir={workdir}", *overrides,
                       devices=devices, check=check, **popen)


def sample(*overrides, devices=None, check=True, cwd=ROOT):
    """Run `python sample.py` (its default config) in a subprocess; returns the CompletedProcess."""
    return run_program("sample.py", *overrides, devices=devices, check=check, cwd=cwd)


def run_program(script, *args, devices=None, check=True, cwd=ROOT, **popen):
    """Run one of our programs in a subprocess: CompletedProcess or, with background=True, Popen.

    Tiny models: compile time dominates, so LLVM runs at -O1 without its expensive passes
    (tests/conftest.py's XLA_FLAGS, inherited) and the runs of a test share a compilation cache
    (results stay exact: every run of a test uses the same setting)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "latentdiff-test-jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    if devices:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    if popen.pop("background", False):
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    if check and out.returncode != 0:
        raise AssertionError(f"{script} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def metrics(workdir):
    """{step: loss} from metrics.jsonl (the last entry of a step wins, as after a resume)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows}
