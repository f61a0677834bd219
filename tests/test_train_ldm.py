"""End to end: train.py on the LDM stage (tiny config, CPU): run, export, resume, shard."""
import os
import signal
import time

import jax
import numpy as np
import pytest

from latentdiff import LatentDiffusionPipeline
from tests.train_utils import image_folder, metrics, train

CONFIG = "configs/tiny_ldm.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_folder(str(tmp_path_factory.mktemp("images")))


def test_train_then_sample(data, tmp_path):
    wd = str(tmp_path / "run")
    out = train(CONFIG, wd, f"--config.data.root={data}", "--config.train.steps=3",
                "--config.train.sample_every=3")
    assert "summary:" in out.stdout
    losses = metrics(wd)
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(list(losses.values())))
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "3"]
    assert os.path.exists(os.path.join(wd, "samples", "step_00000003.png"))
    pipe = LatentDiffusionPipeline.from_pretrained(wd)  # the exported EMA weights
    images = pipe(class_labels=[0, 2], rng=jax.random.key(0), num_inference_steps=4, guidance_scale=2.0)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8


def test_sigkill_then_resume_gives_the_same_losses(data, tmp_path):
    steps = ["--config.train.steps=6", "--config.train.ckpt_every=2", f"--config.data.root={data}"]
    ref = str(tmp_path / "ref")
    train(CONFIG, ref, *steps)
    wd = str(tmp_path / "killed")
    proc = train(CONFIG, wd, *steps, background=True)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill after checkpoint 2 and step 3, before checkpoint 4
        if os.path.exists(os.path.join(wd, "metrics.jsonl")) and 3 in metrics(wd):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(wd, "checkpoints", "6"))
    train(CONFIG, wd, *steps)
    want, got = metrics(ref), metrics(wd)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == want[step], (step, got[step], want[step])


def test_eight_devices_data_by_fsdp_match_one_device(data, tmp_path):
    common = [f"--config.data.root={data}", "--config.train.steps=20", "--config.train.ckpt_every=20",
              "--config.optim.lr=1e-3"]
    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    train(CONFIG, one, *common, "--config.mesh.data=1", "--config.mesh.fsdp=1")
    train(CONFIG, many, *common, "--config.mesh.data=2", "--config.mesh.fsdp=4", devices=8)
    a = jax.tree_util.tree_leaves(LatentDiffusionPipeline.from_pretrained(one).params)
    b = jax.tree_util.tree_leaves(LatentDiffusionPipeline.from_pretrained(many).params)
    # relative error of the whole parameter vector (only summation order differs between meshes)
    diff = np.sqrt(sum(np.sum((np.asarray(x, np.float64) - np.asarray(y)) ** 2) for x, y in zip(a, b)))
    err = diff / np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in a))
    assert err <= 1e-5, err


def test_indivisible_batch_is_refused_before_compiling(data, tmp_path):
    out = train(CONFIG, str(tmp_path / "bad"), f"--config.data.root={data}", "--config.data.batch_size=6",
                "--config.mesh.data=4", devices=4, check=False)
    assert out.returncode != 0
    assert "not divisible by 4 devices" in out.stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    wd = str(tmp_path / "nan")
    out = train(CONFIG, wd, f"--config.data.root={data}", "--config.optim.lr=1e30",
                "--config.train.ckpt_every=1", "--config.train.steps=6", check=False)
    assert out.returncode != 0
    assert "NonFiniteLossError" in out.stderr and "at step 2" in out.stderr, out.stderr[-2000:]
    assert "last good checkpoint is step 1" in out.stderr
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1"]


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(data, tmp_path):
    import shutil

    wd = str(tmp_path / "corrupt")
    steps = [f"--config.data.root={data}", "--config.train.ckpt_every=2"]
    train(CONFIG, wd, *steps, "--config.train.steps=4")
    state_dir = os.path.join(wd, "checkpoints", "4", "state")
    shutil.rmtree(state_dir)
    os.makedirs(state_dir)
    out = train(CONFIG, wd, *steps, "--config.train.steps=6")
    assert "checkpoint at step 4" in out.stderr and "trying the previous one" in out.stderr
    assert "resumed from step 2" in out.stdout


def test_cached_latents_train_and_resume(data, tmp_path):
    wd = str(tmp_path / "cached")
    common = [f"--config.data.root={data}", "--config.data.cache_latents=True", "--config.train.ckpt_every=2",
              "--config.optim.accumulate=2"]
    out = train(CONFIG, wd, *common, "--config.train.steps=2")
    assert "cached 24 latents" in out.stdout
    out = train(CONFIG, wd, *common, "--config.train.steps=4")
    assert "resumed from step 2" in out.stdout and "cached 24" not in out.stdout
    assert sorted(metrics(wd)) == [1, 2, 3, 4]


def test_sigterm_saves_before_exiting(data, tmp_path):
    wd = str(tmp_path / "term")
    proc = train(CONFIG, wd, f"--config.data.root={data}", "--config.train.steps=1000",
                 "--config.train.ckpt_every=1000", background=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (os.path.exists(os.path.join(wd, "metrics.jsonl")) and metrics(wd)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-2000:]
    saved = int(out.split("SIGTERM: saved step ")[1].split(",")[0])
    assert os.listdir(os.path.join(wd, "checkpoints")) == [str(saved)]
