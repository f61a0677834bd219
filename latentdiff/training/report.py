"""The end of a run on the built-in `shapes` data: held-out samples, how well they match, a loss plot.

For each guidance scale of `config.evaluate`, the exported model samples `samples_per_condition`
images per held-out condition (text: the 9 colour/shape/position combinations never trained on;
class: the 12 classes; super-resolution and inpainting: the held-out images, degraded; unconditional:
a batch), with the same noise for every scale. `latentdiff.evaluate` reads colour, shape and position
from the pixels. Grids, the loss plot and `report.json` go to `workdir/report/`; the table and the
command to sample more are printed.
"""
import json
import os

import jax
import numpy as np
from PIL import Image

from latentdiff.data import shapes
from latentdiff.data.transforms import low_resolution, to_uint8
from latentdiff.evaluate import adherence, format_table, recognised
from latentdiff.training.logging import plot_curves, read_metrics, save_grid

GUIDED_TASKS = ("text2img", "class2img")


def inpainting_mask(image_size, shape, position):
    """1 on the upper half of the shape's bounding box: the model must complete the shape."""
    inside = shapes.shape_mask(shape, position, image_size)
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    mask = np.zeros((image_size, image_size), np.float32)
    mask[rows[0]:(rows[0] + rows[-1] + 1) // 2, cols[0]:cols[-1] + 1] = 1
    return mask


def conditions(task, size, vae_scale):
    """-> (pipeline keyword arguments, wanted attributes or None, row names, inputs to show or None),
    one entry per condition."""
    heldout = shapes.HELDOUT
    attrs = [dict(zip(("colour", "shape", "position"), combo)) for combo in heldout]
    if task == "text2img":
        prompts = [shapes.caption(*combo) for combo in heldout]
        return {"prompts": prompts}, prompts, prompts, None
    if task == "class2img":
        names = shapes.CLASS_NAMES
        wanted = [dict(zip(("colour", "shape"), name.split())) for name in names]
        return {"class_labels": list(range(len(names)))}, wanted, names, None
    if task == "uncond":
        return {"num_samples": len(heldout)}, None, ["sample"] * len(heldout), None
    images = np.stack([shapes.render(*combo, size=size) for combo in heldout]).astype(np.float32) / 127.5 - 1
    names = [shapes.caption(*combo) for combo in heldout]
    if task == "superres":
        small = np.asarray(low_resolution(images, (size // vae_scale,) * 2))
        shown = np.repeat(np.repeat(to_uint8(small), vae_scale, 1), vae_scale, 2)
        return {"image": small}, attrs, names, shown
    if task == "inpaint":
        masks = np.stack([inpainting_mask(size, shape, pos) for _, shape, pos in heldout])
        shown = to_uint8(np.where(masks[..., None] > 0, -1.0, images))
        return {"image": images, "mask": masks}, attrs, names, shown
    raise ValueError(f"no shapes report for the '{task}' task")


def _repeat(kwargs, n):
    """Each condition n times in a row."""
    out = {}
    for k, v in kwargs.items():
        if k == "num_samples":
            out[k] = v * n
        elif k == "prompts":
            out[k] = [p for p in v for _ in range(n)]
        else:
            out[k] = np.repeat(np.asarray(v), n, axis=0)
    return out


def report(config, workdir):
    """Sample, score and plot as the module docstring says; returns the table (a dict per scale)."""
    from latentdiff.pipeline import LatentDiffusionPipeline

    if jax.process_index() != 0:
        return None
    ev = config.evaluate
    pipe = LatentDiffusionPipeline.from_pretrained(workdir)
    task, size = pipe.config.task, int(config.data.size)
    kwargs, wanted, names, shown = conditions(task, size, pipe.config.vae_scale)
    out = os.path.join(workdir, "report")
    os.makedirs(out, exist_ok=True)
    if "image" in kwargs:  # an example input for the printed sample.py command
        Image.fromarray(to_uint8(kwargs["image"][0])).save(os.path.join(out, "input.png"))
    if "mask" in kwargs:
        Image.fromarray((kwargs["mask"][0] * 255).astype(np.uint8)).save(os.path.join(out, "mask.png"))
    n = int(ev.samples_per_condition)
    kwargs = _repeat(kwargs, n)
    wanted = None if wanted is None else [w for w in wanted for _ in range(n)]
    guided = task in GUIDED_TASKS and (task == "text2img" or pipe.config.null_class is not None)
    scales = [float(s) for s in ev.guidance_scales] if guided else [1.0]
    table = {}
    for scale in scales:
        images = pipe(**kwargs, rng=jax.random.key(config.seed + 1), num_inference_steps=int(ev.steps),
                      sampler=ev.sampler, guidance_scale=scale)
        table[scale] = adherence(images, wanted) if wanted is not None else {"recognised": recognised(images)}
        rows = images.reshape((len(names), n) + images.shape[1:])
        if shown is not None:
            rows = np.concatenate([shown[:, None], rows], axis=1)
        save_grid(rows.reshape((-1,) + images.shape[1:]), os.path.join(out, f"samples_g{scale:g}.png"),
                  cols=rows.shape[1])
    with open(os.path.join(out, "rows.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(names) + "\n")
    curves = {"LDM loss": read_metrics(workdir)}
    if "autoencoder" in config:
        curves["autoencoder L1"] = read_metrics(config.model.first_stage_config.checkpoint, "rec_loss")
    plot = plot_curves(curves, os.path.join(out, "losses.png"))
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump({"task": task, "samples_per_condition": n, "steps": int(ev.steps), "sampler": ev.sampler,
                   "adherence": {f"{s:g}": v for s, v in table.items()}}, f, indent=1)
    what = {"text2img": "held-out prompts (combinations never seen in training)", "class2img": "every class",
            "uncond": "unconditional samples", "superres": "held-out images, x4 from low resolution",
            "inpaint": "held-out images, the top half of the shape filled in"}[task]
    print(f"\n{what}: {n} samples each, {ev.steps} {ev.sampler} steps; fraction matching")
    print(format_table(table))
    best = max(table, key=lambda s: list(table[s].values())[-1])
    print(f"samples: {os.path.join(out, f'samples_g{best:g}.png')} (rows: {os.path.join(out, 'rows.txt')})")
    if plot:
        print(f"loss plot: {plot}")
    print(f"sample more: {sample_command(task, workdir, out, shown is not None)}")
    return table


def sample_command(task, workdir, out, has_inputs):
    """The `sample.py` command line for this model (and, for image tasks, an example input it writes)."""
    cmd = f"python sample.py --config.pretrained={workdir}"
    if task == "text2img":
        return cmd + " --config.prompts='a green triangle at the top left|a yellow square in the center'"
    if task == "class2img":
        return cmd + " --config.class_labels=0,4,8"
    if task == "uncond":
        return cmd + " --config.num_samples=16"
    return cmd + f" --config.image={os.path.join(out, 'input.png')}" + (
        f" --config.mask={os.path.join(out, 'mask.png')}" if task == "inpaint" else "")
