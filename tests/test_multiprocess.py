"""Two processes on localhost (jax.distributed, 2 fake CPU devices each, gloo collectives) train,
checkpoint, resume and sample exactly as one process with 4 devices and the same global batch."""
import os
import socket

import jax
import numpy as np
import pytest
from PIL import Image

from latentdiff import LatentDiffusionPipeline
from tests.train_utils import ROOT, image_folder, metrics, run_program, sample, train

CONFIG = "configs/tiny_ldm.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_folder(str(tmp_path_factory.mktemp("images")))


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(script, *args):
    """`script` run as two processes of one jax.distributed job, 2 CPU devices each; their outputs."""
    address = f"localhost:{_free_port()}"
    procs = [run_program(script, *args, f"--config.distributed.coordinator_address={address}",
                         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                         devices=2, background=True) for i in range(2)]
    outputs = [p.communicate(timeout=900)[0].decode() for p in procs]
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed ({p.returncode}):\n{out[-4000:]}"
    return outputs


def _train_two_processes(workdir, *overrides):
    return _two_processes("train.py", f"--config={os.path.join(ROOT, CONFIG)}", f"--workdir={workdir}", *overrides)


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

    # sample.py splits one batch over the 4 devices of both processes: the images of one process
    args = (f"--config.pretrained={one}", "--config.num_inference_steps=4", "--config.num_samples=2",
            "--config.batch_size=8")
    wrote = sample(*args, f"--config.outdir={tmp_path / 's_one'}", devices=4).stdout.strip().splitlines()[-1]
    n = int(wrote.split()[1])
    assert n >= 2
    outputs = _two_processes("sample.py", *args, f"--config.outdir={tmp_path / 's_two'}")
    assert f"wrote {n} images" in outputs[0] and "wrote" not in outputs[1]  # process 0 alone writes
    for i in range(n):
        a, b = (np.asarray(Image.open(tmp_path / d / f"{i:05d}.png"), np.int32) for d in ("s_one", "s_two"))
        assert np.abs(a - b).max() <= 1
