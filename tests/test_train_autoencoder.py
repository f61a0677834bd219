"""End to end: train.py on the autoencoder stage, then an LDM on its latents (tiny, CPU)."""
import json
import os

import numpy as np
import pytest

from tests.train_utils import image_folder, metrics, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_folder(str(tmp_path_factory.mktemp("images")))


@pytest.fixture(scope="module")
def autoencoder_run(data, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("ae"))
    train("configs/tiny_autoencoder.py", wd, f"--config.data.root={data}", "--config.train.steps=30",
          "--config.train.ckpt_every=10", "--config.train.sample_every=30", "--config.model.loss.disc_start=20")
    return wd


def test_autoencoder_losses_fall_and_gan_switches_on(autoencoder_run):
    wd = autoencoder_run
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    rec = [r["rec_loss"] for r in rows]
    assert np.mean(rec[-5:]) < 0.7 * np.mean(rec[:5]), rec
    assert all(r["disc_factor"] == 0.0 for r in rows if r["step"] <= 20)
    assert all(r["disc_factor"] == 1.0 for r in rows if r["step"] > 21)
    assert os.path.exists(os.path.join(wd, "samples", "recon_00000030.png"))
    assert os.path.isdir(os.path.join(wd, "autoencoder", "params"))


def test_ldm_trains_on_the_autoencoder_latents(autoencoder_run, data, tmp_path):
    wd = str(tmp_path / "ldm")
    train("configs/tiny_ldm.py", wd, f"--config.data.root={data}",
          f"--config.model.first_stage_config.checkpoint={autoencoder_run}", "--config.train.steps=40",
          "--config.train.ckpt_every=40", "--config.model.scale_by_std=True")
    losses = metrics(wd)
    first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(36, 41)])
    assert last < first, (first, last)


def test_missing_lpips_weights_name_the_files(data, tmp_path):
    out = train("configs/tiny_autoencoder.py", str(tmp_path / "x"), f"--config.data.root={data}",
                "--config.model.loss.perceptual_weight=1.0", check=False)
    assert out.returncode != 0
    assert "vgg16-397923af.pth" in out.stderr and "vgg.pth" in out.stderr
