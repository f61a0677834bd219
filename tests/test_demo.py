"""The built-in demo: `python train.py` trains the shapes autoencoder then the text-to-image LDM and
reports; every task's demo config trains end to end; `sample.py` samples each, and bad input to it is a
one-line error. (Tiny step counts: this checks the programs, not the quality; see README for that.)"""
import json
import os
import shlex

import numpy as np
import pytest
from PIL import Image

from tests.train_utils import ROOT, sample, train

FAST = ["--config.train.steps=2", "--config.train.log_every=1", "--config.data.num_examples=64",
        "--config.data.batch_size=8", "--config.evaluate.steps=4", "--config.evaluate.samples_per_condition=1",
        "--config.evaluate.guidance_scales=(1.0,3.0)"]
FAST_AE = ["--config.autoencoder.train.steps=2", "--config.autoencoder.train.log_every=1",
           "--config.autoencoder.data.num_examples=64", "--config.autoencoder.data.batch_size=4"]
TASK_CONFIGS = {"demo_class": "class2img", "demo_uncond": "uncond", "demo_superres": "superres",
                "demo_inpaint": "inpaint"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The default config (configs/demo.py) run briefly: (its workdir, the autoencoder dir, stdout)."""
    root = tmp_path_factory.mktemp("demo")
    ae, wd = str(root / "shapes_autoencoder"), str(root / "demo")
    out = train("configs/demo.py", wd, f"--config.model.first_stage_config.checkpoint={ae}", *FAST, *FAST_AE)
    return wd, ae, out.stdout


def sample_command(stdout):
    """The `sample.py` arguments the report printed."""
    line = [l for l in stdout.splitlines() if l.startswith("sample more: ")][-1]
    args = shlex.split(line[len("sample more: "):])
    assert args[:2] == ["python", "sample.py"]
    return args[2:]


def test_vocab_file_is_the_datasets_vocabulary():
    from latentdiff.data import shapes

    with open(os.path.join(ROOT, "configs", "shapes_vocab.txt")) as f:
        assert f.read().split("\n")[:-1] == shapes.vocabulary()


def test_demo_trains_the_first_stage_then_the_ldm_and_reports(demo):
    wd, ae, stdout = demo
    assert os.path.isdir(os.path.join(ae, "autoencoder", "params"))
    assert "held-out prompts" in stdout and "guidance  colour  shape  position    all" in stdout
    with open(os.path.join(wd, "report", "report.json")) as f:
        report = json.load(f)
    assert report["task"] == "text2img" and set(report["adherence"]) == {"1", "3"}
    assert set(report["adherence"]["3"]) == {"colour", "shape", "position", "all"}
    grid = np.asarray(Image.open(os.path.join(wd, "report", "samples_g3.png")))
    assert grid.shape == (9 * 32, 32, 3)  # a row per held-out prompt, one sample each
    assert Image.open(os.path.join(wd, "report", "losses.png")).size[0] > 0


def test_an_autoencoder_that_does_not_fit_the_config_is_refused(demo, tmp_path):
    _, ae, _ = demo
    bad = train("configs/demo_class.py", str(tmp_path / "bad"), f"--config.model.first_stage_config.checkpoint={ae}",
                "--config.autoencoder.model.ddconfig.ch=64", *FAST, check=False)
    assert bad.returncode != 0 and "holds an autoencoder whose ddconfig" in bad.stderr


def test_sample_py_with_no_flags_samples_the_demo(demo, tmp_path):
    wd, _, _ = demo
    os.makedirs(tmp_path / "workdir")
    os.symlink(wd, tmp_path / "workdir" / "demo")
    sample("--config.num_inference_steps=4", "--config.num_samples=1", cwd=str(tmp_path))
    with open(tmp_path / "samples" / "index.txt") as f:
        index = [line.rstrip("\n").split("\t") for line in f]
    assert len(index) == 9 and index[0][1].startswith("a ")
    assert Image.open(tmp_path / "samples" / "00008.png").size == (32, 32)
    assert os.path.exists(tmp_path / "samples" / "grid.png")


@pytest.mark.parametrize("config", sorted(TASK_CONFIGS))
def test_task_demo_trains_and_its_printed_sample_command_works(demo, tmp_path, config):
    _, ae, _ = demo
    wd = str(tmp_path / config)
    before = os.path.getmtime(os.path.join(ae, "autoencoder", "config.json"))
    out = train(f"configs/{config}.py", wd, f"--config.model.first_stage_config.checkpoint={ae}", *FAST)
    assert "training the first stage" not in out.stdout  # the demo's autoencoder is reused as it is
    assert os.path.getmtime(os.path.join(ae, "autoencoder", "config.json")) == before
    with open(os.path.join(wd, "report", "report.json")) as f:
        assert json.load(f)["task"] == TASK_CONFIGS[config]
    outdir = str(tmp_path / "samples")
    # the report's batch (one sample per held-out condition): sample.py reuses its compiled program
    from latentdiff.data import shapes

    batch = len(shapes.CLASS_NAMES) if config == "demo_class" else len(shapes.HELDOUT)
    sample(*sample_command(out.stdout), "--config.num_inference_steps=4", f"--config.batch_size={batch}",
           f"--config.outdir={outdir}")
    pngs = [f for f in os.listdir(outdir) if f[0].isdigit()]
    assert pngs and all(Image.open(os.path.join(outdir, f)).size == (32, 32) for f in pngs)
    if config == "demo_superres":  # 5 pixels: not a multiple of the model's 2-pixel unit
        Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "small.png")
        _one_line_error(sample(f"--config.pretrained={wd}", f"--config.image={tmp_path / 'small.png'}",
                               f"--config.outdir={outdir}", check=False), "multiples of")


def test_sample_py_splits_the_batch_over_devices_with_the_same_images(demo, tmp_path):
    wd, _, _ = demo
    args = (f"--config.pretrained={wd}", "--config.num_inference_steps=4", "--config.batch_size=8",
            "--config.negative_prompt=a red square")  # one row of unconditional tokens beside 8 prompts
    sample(*args, f"--config.outdir={tmp_path / 'one'}")
    sample(*args, f"--config.outdir={tmp_path / 'four'}", devices=4)
    for i in range(9):
        one, four = (np.asarray(Image.open(tmp_path / d / f"{i:05d}.png"), np.int32) for d in ("one", "four"))
        assert np.abs(one - four).max() <= 1


def _one_line_error(out, *fragments):
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert "Traceback" not in out.stderr and lines[-1].startswith("error: "), out.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_sample_py_bad_input_is_one_line_and_exit_2(demo, tmp_path):
    wd, _, _ = demo
    _one_line_error(sample(f"--config.pretrained={tmp_path / 'nothing'}", check=False), "no checkpoint at")
    _one_line_error(sample(f"--config.pretrained={wd}", "--config.prompts=a purple circle at the top left",
                           check=False), "'purple'", "[UNK]")
    _one_line_error(sample(f"--config.pretrained={wd}", "--config.negative_prompt=a purple circle", check=False),
                    "'purple'", "[UNK]")
    _one_line_error(sample(f"--config.pretrained={wd}", "--config.class_labels=1", check=False),
                    "class_labels cannot be used")
    _one_line_error(sample("--config.bogus=1", check=False), "unknown config key")


def test_image_inputs_that_do_not_fit_are_user_errors(tmp_path):
    """In-process (no compile needed): wrong image size for the model, wrong mask shape, missing mask."""
    import ml_collections

    from latentdiff.sampling import UserInputError, inputs
    from configs.sample import get_config

    class Pipe:  # only what `inputs` reads
        config = ml_collections.ConfigDict(dict(task="inpaint"))

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "mask.png")
    c = get_config()
    c.image = str(tmp_path / "image.png")
    with pytest.raises(UserInputError, match="needs --config.mask"):
        inputs(c, Pipe)
    c.mask = str(tmp_path / "mask.png")
    with pytest.raises(UserInputError, match="mask of 16x16 pixels does not match the 32x32 image"):
        inputs(c, Pipe)
    c.image = str(tmp_path / "missing.png")
    with pytest.raises(UserInputError, match="does not exist"):
        inputs(c, Pipe)


def test_negative_prompt_without_guidance_is_a_user_error():
    """In-process: sample.py refuses a negative prompt that guidance_scale 1 would ignore."""
    import ml_collections

    from configs.sample import get_config
    from latentdiff.sampling import UserInputError, guidance_scale

    class Pipe:  # only what `guidance_scale` reads
        config = ml_collections.ConfigDict(dict(task="text2img", null_class=None))

    c = get_config()
    c.negative_prompt, c.guidance_scale = "a red square", 1.0
    with pytest.raises(UserInputError, match="negative_prompt acts through guidance"):
        guidance_scale(c, Pipe)
    c.guidance_scale = -1.0
    assert guidance_scale(c, Pipe) == 3.0
    older = ml_collections.ConfigDict({k: v for k, v in c.items() if k not in ("negative_prompt", "param_dtype")})
    assert guidance_scale(older, Pipe) == 3.0  # a settings file from before these two keys
