"""What `sample.py` does: load a model, turn the settings into batches, sample them, write PNGs.

`run(config)` takes `configs/sample.py`'s settings. Inputs are checked before anything is compiled;
a problem with them raises `UserInputError`, which sample.py prints as one line (exit status 2).
"""
import os

import jax
import numpy as np
from PIL import Image

from latentdiff.runtime import DTYPES

IMAGE_TASKS = ("superres", "inpaint", "semantic")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_GUIDANCE = 3.0
INPUT_KEYS = {"prompts": ("text2img",), "prompts_file": ("text2img",), "negative_prompt": ("text2img",),
              "class_labels": ("class2img",), "image": IMAGE_TASKS, "mask": ("inpaint",)}  # setting -> its tasks


class UserInputError(ValueError):
    """Bad settings or inputs: a missing checkpoint, an unknown word, an image that does not fit."""


def run(config):
    """Sample as `config` says; returns the written paths (one per image, then the grid)."""
    from latentdiff.pipeline import LatentDiffusionPipeline
    from tqdm import tqdm

    from latentdiff.training.logging import save_grid

    pipe = load(config, LatentDiffusionPipeline)
    task = pipe.config.task
    items, names = inputs(config, pipe)
    guidance = guidance_scale(config, pipe)
    batch = _round_up(max(1, int(config.batch_size)), jax.device_count())
    writer = jax.process_index() == 0  # with several processes, every one samples; the first writes
    kw = dict(num_inference_steps=int(config.num_inference_steps), guidance_scale=guidance, eta=float(config.eta),
              sampler=config.sampler, height=int(config.height) or None, width=int(config.width) or None)
    if config.get("negative_prompt"):
        kw["negative_prompt"] = config.negative_prompt
    rng = jax.random.key(int(config.seed))
    if writer:
        os.makedirs(config.outdir, exist_ok=True)
    images, bar = [], tqdm(total=len(names), unit="img", dynamic_ncols=True, disable=not writer)
    try:
        for start in range(0, len(names), batch):
            chunk = {k: _pad(v[start:start + batch], batch) for k, v in items.items()}
            if task == "uncond":
                chunk = {"num_samples": batch}
            try:
                out = pipe(**chunk, rng=jax.random.fold_in(rng, start), **kw)
            except ValueError as e:  # shapes that do not fit the model, a bad sampler, ...
                raise UserInputError(str(e)) from e
            images.extend(out[:min(batch, len(names) - start)])
            bar.update(len(out[:min(batch, len(names) - start)]))
    finally:
        bar.close()
    paths = [os.path.join(config.outdir, f"{i:05d}.png") for i in range(len(images))]
    grid = os.path.join(config.outdir, "grid.png")
    if writer:
        for path, image in zip(paths, images):
            Image.fromarray(image).save(path)
        with open(os.path.join(config.outdir, "index.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{os.path.basename(p)}\t{n}\n" for p, n in zip(paths, names))
        save_grid(np.stack(images), grid, cols=min(len(images), max(int(config.num_samples), 4)))
    return paths + [grid]


def load(config, pipeline_cls):
    path = config.pretrained
    if not path or not os.path.exists(path):
        hint = " (the demo writes it: run `python train.py` first)" if path == "workdir/demo" else ""
        raise UserInputError(f"no checkpoint at '{path}'{hint}; set --config.pretrained to our checkpoint or "
                             f"training workdir, a diffusers folder, or a CompVis .ckpt")
    dtype, param_dtype = DTYPES.get(config.dtype), DTYPES.get(config.get("param_dtype") or config.dtype)
    if dtype is None or param_dtype is None:
        raise UserInputError(f"dtype and param_dtype must be 'float32' or 'bfloat16', got '{config.dtype}' "
                             f"and '{config.get('param_dtype')}'")
    try:
        return pipeline_cls.from_pretrained(path, config=config.config or None, dtype=dtype, param_dtype=param_dtype,
                                            use_ema=config.use_ema)
    except (ValueError, OSError) as e:
        raise UserInputError(f"cannot load '{path}': {e}") from e


def guidance_scale(config, pipe):
    """-1 means DEFAULT_GUIDANCE where the model has an unconditional input, else 1.0."""
    has_uncond = pipe.config.task == "text2img" or (pipe.config.task == "class2img"
                                                    and pipe.config.null_class is not None)
    scale = float(config.guidance_scale)
    if scale < 0:
        return DEFAULT_GUIDANCE if has_uncond else 1.0
    if scale != 1.0 and not has_uncond:
        raise UserInputError(f"guidance_scale {scale} needs an unconditional input, which this "
                             f"'{pipe.config.task}' model does not have; leave guidance_scale at -1 or 1")
    if scale == 1.0 and config.get("negative_prompt"):
        raise UserInputError("negative_prompt acts through guidance: leave guidance_scale at -1 or set it other than 1")
    return scale


def inputs(config, pipe):
    """-> ({pipeline keyword: array or list, one entry per image}, a name per image)."""
    task, n = pipe.config.task, int(config.num_samples)
    unused = [k for k in INPUT_KEYS if config.get(k) and task not in INPUT_KEYS[k]]  # .get: older config files
    if unused:
        raise UserInputError(f"{', '.join(unused)} cannot be used with this '{task}' model")
    if n < 1:
        raise UserInputError(f"num_samples must be at least 1, got {n}")
    if task == "text2img":
        prompts = read_prompts(config)
        check_vocabulary(pipe.tokenizer, prompts + [config.get("negative_prompt", "")])
        prompts = [p for p in prompts for _ in range(n)]
        return {"prompts": prompts}, prompts
    if task == "class2img":
        labels = read_labels(config.class_labels, pipe.cond_model.n_classes, pipe.config.null_class)
        labels = np.repeat(labels, n)
        return {"class_labels": labels}, [f"class {label}" for label in labels]
    if task == "uncond":
        return {}, ["unconditional"] * n
    files = image_files(config.image, "image")
    images = np.stack([read_image(f, task, pipe) for f in files])
    found = {"image": images}
    if task == "inpaint":
        masks = image_files(config.mask, "mask")
        if len(masks) != len(files):
            raise UserInputError(f"{len(files)} images but {len(masks)} masks: give one mask per image")
        found["mask"] = np.stack([np.asarray(Image.open(m).convert("L"), np.float32) / 255.0 for m in masks])
        if found["mask"].shape[1:3] != images.shape[1:3]:
            raise UserInputError(f"a mask of {found['mask'].shape[1]}x{found['mask'].shape[2]} pixels does not "
                                 f"match the {images.shape[1]}x{images.shape[2]} image")
    found = {k: np.repeat(v, n, axis=0) for k, v in found.items()}
    return found, [os.path.basename(f) for f in files for _ in range(n)]


def read_prompts(config):
    if config.prompts and config.prompts_file:
        raise UserInputError("give prompts or prompts_file, not both")
    if config.prompts_file:
        if not os.path.exists(config.prompts_file):
            raise UserInputError(f"prompts_file '{config.prompts_file}' does not exist")
        with open(config.prompts_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    elif config.prompts:
        prompts = [p.strip() for p in config.prompts.split("|") if p.strip()]
    else:
        from latentdiff.data import shapes

        prompts = [shapes.caption(*combo) for combo in shapes.HELDOUT]
    if not prompts:
        raise UserInputError("no prompts given")
    return prompts


def check_vocabulary(tokenizer, prompts):
    """Words the tokenizer can only spell as [UNK] are an error: the model never learned them."""
    for prompt in prompts:
        unknown = tokenizer.unknown_words(prompt)
        if unknown:
            raise UserInputError(f"prompt {prompt!r}: {', '.join(repr(w) for w in unknown)} map to [UNK] in this "
                                 f"model's vocabulary ({tokenizer.vocab_size} tokens); use words it knows")


def read_labels(text, n_classes, null_class):
    if not str(text).strip():
        labels = [c for c in range(n_classes) if c != null_class]
        if len(labels) > 16:
            raise UserInputError(f"this model has {len(labels)} classes: choose some with --config.class_labels=0,1,2")
        return np.array(labels, np.int32)
    try:
        labels = np.array([int(x) for x in str(text).replace(" ", "").split(",") if x != ""], np.int32)
    except ValueError as e:
        raise UserInputError(f"class_labels must be integers separated by commas, got '{text}'") from e
    if labels.size == 0 or labels.min() < 0 or labels.max() >= n_classes:
        raise UserInputError(f"class_labels must lie in [0, {n_classes}), got '{text}'")
    return labels


def image_files(path, what):
    if not path:
        raise UserInputError(f"this model needs --config.{what}: a file or a folder of images")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise UserInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder '{path}'")
        return files
    if not os.path.exists(path):
        raise UserInputError(f"{what} '{path}' does not exist")
    return [path]


def read_image(path, task, pipe):
    """uint8 RGB for image tasks; one-hot float for a semantic map (a PNG of class indices)."""
    try:
        image = Image.open(path)
        if task != "semantic":
            return np.asarray(image.convert("RGB"))
        classes = pipe.cond_model.in_channels
        index = np.asarray(image.convert("L"), np.int64)
    except OSError as e:
        raise UserInputError(f"cannot read image '{path}': {e}") from e
    if index.max() >= classes:
        raise UserInputError(f"'{path}' has class index {index.max()}, the model knows {classes} classes")
    return np.eye(classes, dtype=np.float32)[index]


def _round_up(n, k):
    return -(-n // k) * k


def _pad(v, n):
    """A chunk padded to n entries by repeating its last one (one compiled program for every chunk)."""
    if isinstance(v, list):
        return v + [v[-1]] * (n - len(v))
    return np.concatenate([v, np.repeat(v[-1:], n - len(v), axis=0)]) if len(v) < n else v
