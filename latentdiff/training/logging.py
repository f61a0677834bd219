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
