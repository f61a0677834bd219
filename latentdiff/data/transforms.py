"""The paper's image preprocessing on PIL/numpy: decode, square crop, bicubic resize, flip, [-1, 1].

`ldm/data/lsun.py` crops the largest centred square, resizes it to `size` (bicubic) and flips with
p = 0.5; taming's `ImagePaths` (ImageNet) resizes the shorter side to `size` and then takes a centre
or random `size` crop. `Preprocess` does both as one operation: a square of the shorter side's length
(centred, or at a uniformly random offset), resized to `size` x `size`; the two orders agree up to
pixel rounding, and the centre crop is exactly the LSUN code.
"""
import dataclasses
import io

import numpy as np
from PIL import Image

_PER_EXAMPLE = 1  # seed-sequence domain tag; the loader's permutation uses 0


def decode_image(data):
    """An RGB `PIL.Image`, fully decoded, from encoded bytes or a uint8 (H, W[, C]) array.

    Raises (OSError, ValueError, ...) on corrupt data; the loader skips such examples.
    """
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim not in (2, 3):
            raise ValueError(f"expected a uint8 (H, W[, C]) image array, got {data.dtype} {data.shape}")
        image = Image.fromarray(data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data)
    else:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now, so that a truncated file fails here and not later
    return image if image.mode == "RGB" else image.convert("RGB")


def example_rng(seed, epoch, index):
    """The generator of example `index`'s augmentation in `epoch`: fixed by (seed, epoch, index)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, _PER_EXAMPLE, index]))


def to_float(image):
    """uint8 HWC -> float32 in [-1, 1], computed as the paper does (in float64, then cast)."""
    return (np.asarray(image) / 127.5 - 1.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Square crop (centre, or random with `random_crop`), bicubic resize to `size`, flip p=0.5.

    `__call__(image, rng)` maps an RGB `PIL.Image` to float32 (size, size, 3) in [-1, 1]; all of its
    randomness comes from `rng` (see `example_rng`), so a resumed loader repeats it exactly.
    """

    size: int = 256
    random_crop: bool = False
    random_flip: bool = False

    def __post_init__(self):
        if not isinstance(self.size, (int, np.integer)) or isinstance(self.size, bool) or self.size < 1:
            raise ValueError(f"size must be a positive int, got {self.size!r}")

    def __call__(self, image, rng):
        width, height = image.size
        side = min(width, height)
        if self.random_crop:
            left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        else:
            left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((self.size, self.size), resample=Image.Resampling.BICUBIC)
        array = np.asarray(image)
        if self.random_flip and rng.random() < 0.5:
            array = array[:, ::-1]
        return to_float(array)


def to_uint8(images):
    """[-1, 1] float images -> uint8 [0, 255] (clipped, rounded)."""
    return np.round((np.clip(np.asarray(images), -1, 1) + 1) * 127.5).astype(np.uint8)


def low_resolution(images, hw):
    """The super-resolution input of [-1, 1] NHWC images: downsampled to `hw` by antialiased bicubic
    (a clean stand-in for the paper's BSR degradation); used by training and by the shapes data."""
    import jax

    return jax.image.resize(images, (images.shape[0], *hw, images.shape[-1]), "bicubic")
