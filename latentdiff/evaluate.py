"""Prompt adherence for images of the built-in `shapes` dataset, judged from pixels only.

`classify(image)` reads an image's (colour, shape, position): the foreground is the pixels far
from the background grey; its colour is the palette colour nearest its median pixel; its position
the one of the five centres nearest its centroid; its shape is the square, circle or triangle drawn
in its bounding box that overlaps it best (intersection over union), which tolerates blurred edges. `adherence(images, prompts)` is the fraction
of images whose colour, shape, position, and all three, match their prompt.
"""
import re

import numpy as np

from latentdiff.data.shapes import BACKGROUND, COLOURS, POSITIONS, SHAPES, position_centre, shape_mask

FOREGROUND_DISTANCE = 80.0  # RGB distance from the background beyond which a pixel is foreground
MIN_PIXELS = 4  # fewer foreground pixels than this: nothing is recognised
ATTRIBUTES = ("colour", "shape", "position")
_PALETTE = np.array(list(COLOURS.values()), np.float32)


def classify(image):
    """{"colour", "shape", "position"} of a uint8 (H, W, 3) image; values are None where no shape shows."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square (H, W, 3) image, got shape {image.shape}")
    pixels = image.astype(np.float32)
    foreground = np.linalg.norm(pixels - np.array(BACKGROUND, np.float32), axis=-1) > FOREGROUND_DISTANCE
    if foreground.sum() < MIN_PIXELS:
        return dict.fromkeys(ATTRIBUTES)
    median = np.median(pixels[foreground], axis=0)
    colour_index = int(np.argmin(np.linalg.norm(_PALETTE - median, axis=-1)))
    colour = list(COLOURS)[colour_index]
    # the shape proper: foreground pixels whose nearest palette colour is the shape's (drops stray specks)
    nearest = np.argmin(np.linalg.norm(pixels[..., None, :] - _PALETTE, axis=-1), axis=-1)
    shape_pixels = foreground & (nearest == colour_index)
    if shape_pixels.sum() < MIN_PIXELS:
        shape_pixels = foreground
    rows, cols = np.nonzero(shape_pixels)
    shape = _best_template(shape_pixels[rows.min():rows.max() + 1, cols.min():cols.max() + 1])
    size = image.shape[0]
    cy, cx = rows.mean() + 0.5, cols.mean() + 0.5
    distances = [np.hypot(cx - x, cy - y) for x, y in (position_centre(p, size) for p in POSITIONS)]
    return {"colour": colour, "shape": shape, "position": POSITIONS[int(np.argmin(distances))]}


def _best_template(inside):
    """The shape whose template, drawn in the bounding box of bool mask `inside`, has the best IoU."""
    h, w = inside.shape
    v, u = np.mgrid[0:h, 0:w]
    u = (u + 0.5) / w * 2 - 1  # -1..1 across the box
    v = (v + 0.5) / h * 2 - 1
    templates = {"square": np.ones_like(inside), "circle": u * u + v * v <= 1.0,
                 "triangle": np.abs(u) <= (v + 1) / 2}  # apex at the top, base at the bottom
    iou = {k: (t & inside).sum() / max((t | inside).sum(), 1) for k, t in templates.items()}
    return max(SHAPES, key=iou.get)


def parse_prompt(prompt):
    """{"colour", "shape", "position"} named in a prompt such as "a red circle at the top left"."""
    text = " ".join(re.findall(r"[a-z]+", str(prompt).lower())).replace("centre", "center")
    found = {"colour": [c for c in COLOURS if re.search(rf"\b{c}\b", text)],
             "shape": [s for s in SHAPES if re.search(rf"\b{s}s?\b", text)],
             "position": [p for p in POSITIONS if re.search(rf"\b{p}\b", text)]}
    wrong = [f"{len(v)} {k}s ({', '.join(v)})" if v else f"no {k}" for k, v in found.items() if len(v) != 1]
    if wrong:
        raise ValueError(f"cannot parse prompt {prompt!r}: it names {'; '.join(wrong)}; expected one of each of "
                         f"colours {list(COLOURS)}, shapes {list(SHAPES)}, positions {list(POSITIONS)}")
    return {k: v[0] for k, v in found.items()}


def adherence(images, prompts):
    """{"colour", "shape", "position", "all"}: fractions of `images` (uint8 N x H x W x 3) matching `prompts`.

    A prompt is a string ("a red circle at the top left") or a dict of the attributes wanted, e.g.
    {"colour": "red", "shape": "circle"} for a class label; only the attributes every prompt names
    are scored ("all": every scored attribute matches).
    """
    prompts = list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if not prompts:
        raise ValueError("no images to evaluate")
    # parse all first: a bad prompt fails before any work
    wanted = [dict(p) if isinstance(p, dict) else parse_prompt(p) for p in prompts]
    scored = [k for k in ATTRIBUTES if all(k in w for w in wanted)]
    if not scored:
        raise ValueError(f"the prompts share no attribute to score; expected some of {ATTRIBUTES}")
    hits = {k: 0 for k in (*scored, "all")}
    for image, want in zip(images, wanted):
        got = classify(image)
        matches = [got[k] == want[k] for k in scored]
        for k, match in zip(scored, matches):
            hits[k] += match
        hits["all"] += all(matches)
    return {k: v / len(prompts) for k, v in hits.items()}


def recognised(images, min_iou=0.6):
    """The fraction of images showing one clean shape: the shape `classify` reads, drawn where it
    reads it, covers the foreground with IoU >= min_iou (for unconditional samples)."""
    hits = 0
    for image in images:
        got = classify(image)
        if got["shape"] is None:
            continue
        image = np.asarray(image, np.float32)
        foreground = np.linalg.norm(image - np.array(BACKGROUND, np.float32), axis=-1) > FOREGROUND_DISTANCE
        template = shape_mask(got["shape"], got["position"], image.shape[0])
        hits += (template & foreground).sum() / (template | foreground).sum() >= min_iou
    return hits / len(images)


def format_table(rows, key="guidance"):
    """A plain-text table of `rows`: a list of dicts, or {scale: {"colour": frac, ...}} (first column `key`)."""
    if isinstance(rows, dict):
        rows = [{key: scale, **fractions} for scale, fractions in rows.items()]
    rows = list(rows)
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(value, column):
        if isinstance(value, (float, np.floating)) and column != key:  # the scale is shown as given
            return f"{value:.3f}"
        return "" if value is None else str(value)

    table = [columns] + [[cell(row.get(c), c) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
