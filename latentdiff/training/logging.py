"""Run output: metrics to stdout/JSONL/TensorBoard, a progress bar, PNG grids."""
import json
import os

import numpy as np


class MetricWriter:
    """Scalars to `workdir/metrics.jsonl` and, when tensorboardX is installed, TensorBoard."""

    def __init__(self, workdir, enabled=True):
        self.enabled = enabled
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") if enabled else None
        self._tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:
                pass

    def write(self, step, scalars):
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, float(v), int(step))

    def close(self):
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


class progress:
    """A tqdm bar showing step, loss, img/s and ETA (silent on processes other than 0)."""

    def __init__(self, start, total, enabled=True):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def set(self, step, loss, img_per_s):
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{img_per_s:.1f}")

    def close(self):
        if self._bar is not None:
            self._bar.close()


def make_grid(images, cols=None):
    """uint8 (B, H, W, C) -> one uint8 image with the batch tiled in rows."""
    images = np.asarray(images)
    b, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
    return grid


def save_grid(images, path, cols=None):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(make_grid(images, cols)).save(path)


def read_metrics(workdir, key="loss"):
    """(steps, values) of `key` in `workdir/metrics.jsonl` (the last entry wins for a repeated step)."""
    points = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if key in row:
                    points[row["step"]] = row[key]
    steps = sorted(points)
    return np.array(steps), np.array([points[s] for s in steps], np.float64)


def plot_curves(curves, path, size=(360, 240)):
    """A PNG with one panel per curve: {title: (steps, values)}, log-scale y, drawn with PIL."""
    from PIL import Image, ImageDraw

    curves = {k: v for k, v in curves.items() if len(v[0]) > 1}
    if not curves:
        return None
    w, h = size
    canvas = Image.new("RGB", (w * len(curves), h), "white")
    draw = ImageDraw.Draw(canvas)
    left, right, top, bottom = 48, 10, 22, 28
    for n, (title, (steps, values)) in enumerate(curves.items()):
        x0 = n * w
        values = np.log10(np.maximum(values, 1e-12))
        lo, hi = values.min(), values.max()
        hi = hi if hi > lo else lo + 1.0
        px = x0 + left + (steps - steps.min()) / max(steps.max() - steps.min(), 1) * (w - left - right)
        py = top + (hi - values) / (hi - lo) * (h - top - bottom)
        draw.rectangle([x0 + left, top, x0 + w - right, h - bottom], outline=(160, 160, 160))
        draw.line(list(zip(px.tolist(), py.tolist())), fill=(30, 60, 200), width=2)
        draw.text((x0 + left, 4), f"{title} (log scale)", fill="black")
        draw.text((x0 + 2, top - 4), f"{10 ** hi:.3g}", fill="black")
        draw.text((x0 + 2, h - bottom - 8), f"{10 ** lo:.3g}", fill="black")
        draw.text((x0 + left, h - bottom + 6), f"step {int(steps.min())}", fill="black")
        draw.text((x0 + w - right - 70, h - bottom + 6), f"step {int(steps.max())}", fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path
