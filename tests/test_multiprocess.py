"""Two processes on localhost (jax.distributed, 2 fake CPU devices each, gloo collectives) train,
checkpoint and resume exactly as one process with 4 devices and the same global batch."""
import socket

import jax
import numpy as np
import pytest

from latentdiff import LatentDiffusionPipeline
from tests.train_utils import image_folder, metrics, train

CONFIG = "configs/tiny_ldm.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_folder(str(tmp_path_factory.mktemp("images")))


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train_two_processes(workdir, *overrides):
    address = f"localhost:{_free_port()}"
    procs = [train(CONFIG, workdir, *overrides, f"--config.distributed.coordinator_address={address}",
                   "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                   devices=2, background=True) for i in range(2)]
    outputs = [p.communicate(timeout=900)[0].decode() for p in procs]
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed ({p.returncode}):\n{out[-4000:]}"
    return outputs


def _relative_error(a_dir, b_dir):
    a = jax.tree_util.tree_leaves(LatentDiffusionPipeline.from_pretrained(a_dir).params)
    b = jax.tree_util.tree_leaves(LatentDiffusionPipeline.from_pretrained(b_dir).params)
    diff = np.sqrt(sum(np.sum((np.asarray(x, np.float64) - np.asarray(y)) ** 2) for x, y in zip(a, b)))
    return diff / np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in a))


def test_two_processes_train_and_resume_as_one_process_with_four_devices(data, tmp_path):
    common = [f"--config.data.root={data}", "--config.optim.lr=1e-3", "--config.train.ckpt_every=5"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train(CONFIG, one, *common, "--config.train.steps=10", devices=4)
    outputs = _train_two_processes(two, *common, "--config.train.steps=10")
    assert "summary:" in outputs[0] and "summary:" not in outputs[1]  # process 0 alone reports
    assert _relative_error(one, two) <= 1e-5

    # both restart from their step-10 checkpoints and go on to step 14
    train(CONFIG, one, *common, "--config.train.steps=14", devices=4)
    _train_two_processes(two, *common, "--config.train.steps=14")
    assert _relative_error(one, two) <= 1e-5
    a, b = metrics(one), metrics(two)
    assert sorted(b) == list(range(1, 15))
    np.testing.assert_allclose([b[s] for s in range(1, 15)], [a[s] for s in range(1, 15)], rtol=1e-5)
