"""`shapes`: a built-in, procedurally drawn, captioned dataset (no download), for tests and demos.

Each image is one filled shape (circle, square, triangle) of one saturated colour (red, green, blue,
yellow), half the side wide (at 40%, a small f4 autoencoder trained for minutes rounds squares into
circles), centred at one of five positions (the four quadrant centres, at 1/4 and 3/4 of the side,
or the middle), on a plain light-grey background. Its caption reads
"a red circle at the top left" ("... in the center"), its class label is the (colour, shape) pair
(12 classes, `CLASS_NAMES`). Example i of a `ShapesSource` is a fixed function of (i, seed, split).

The 60 (colour, shape, position) combinations are numbered `combination_index`; those with
`index % 7 == 3` (`HELDOUT`, 9 of them) never occur in the 'train' split and make up the 'heldout'
split, so that a model trained on 'train' can be prompted with captions it has not seen.

Do not train with `random_flip`: a flip moves a left shape to the right and its caption goes wrong.
"""
import numpy as np

from latentdiff.data.sources import _example
from latentdiff.data.transforms import low_resolution, to_uint8

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 205, 20)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
BACKGROUND = (210, 210, 210)
SHAPE_FRACTION = 0.5  # a shape's width and height, as a fraction of the image side
CLASS_NAMES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
SPLITS = ("train", "heldout")


def combination_index(colour, shape, position):
    """0..59: ((colour * 3) + shape) * 5 + position, in the order of COLOURS, SHAPES, POSITIONS."""
    return (list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)) * len(POSITIONS) \
        + POSITIONS.index(position)


COMBINATIONS = [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]  # in combination_index order
HELDOUT = [combo for n, combo in enumerate(COMBINATIONS) if n % 7 == 3]
TRAIN = [combo for n, combo in enumerate(COMBINATIONS) if n % 7 != 3]


def caption(colour, shape, position):
    where = "in the center" if position == "center" else f"at the {position}"
    return f"a {colour} {shape} {where}"


def vocabulary():
    """The lines of a BERT WordPiece `vocab.txt` covering every caption: special tokens, then words."""
    from latentdiff.models.tokenizer import SPECIAL_TOKENS

    words = sorted({w for combo in COMBINATIONS for w in caption(*combo).split()})
    return list(SPECIAL_TOKENS) + words


def position_centre(position, size):
    """(x, y) in pixels (continuous coordinates: pixel (col, row) covers [col, col + 1))."""
    if position == "center":
        return size / 2, size / 2
    vertical, horizontal = position.split()
    return (size / 4 if horizontal == "left" else 3 * size / 4), (size / 4 if vertical == "top" else 3 * size / 4)


def shape_mask(shape, position, size):
    """bool (size, size): the pixels whose centres lie inside the shape."""
    cx, cy = position_centre(position, size)
    half = SHAPE_FRACTION * size / 2
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = x - cx, y - cy
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        t = (dy + half) / (2 * half)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= half * t)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(colour, shape, position, size=32):
    """uint8 (size, size, 3)."""
    image = np.empty((size, size, 3), np.uint8)
    image[...] = BACKGROUND
    image[shape_mask(shape, position, size)] = COLOURS[colour]
    return image


class ShapesSource:
    """`num_examples` examples of `split` ('train' or 'heldout'), drawn at `size` pixels.

    Example i's combination is drawn uniformly from the split's combinations by a generator seeded
    with (seed, split, i). `attributes(i)`, `mask(i)` (the shape's bounding box, float32 HxW, for
    inpainting) and `low_res(i, factor)` (box-downsampled uint8, for super-resolution) go with it.
    """

    class_names = CLASS_NAMES
    has_labels = True
    has_captions = True

    def __init__(self, size=32, num_examples=10_000, seed=0, split="train"):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if not isinstance(size, (int, np.integer)) or size < 8:
            raise ValueError(f"size must be an int >= 8, got {size!r}")
        if num_examples < 1 or seed < 0:
            raise ValueError(f"need num_examples >= 1 and seed >= 0, got {num_examples}, {seed}")
        self.size, self.num_examples, self.seed, self.split = int(size), int(num_examples), int(seed), split
        self.combinations = TRAIN if split == "train" else HELDOUT

    def __len__(self):
        return self.num_examples

    def _combination(self, i):
        i = int(i)
        if not 0 <= i < self.num_examples:
            raise IndexError(f"example {i} is out of range for {self.num_examples} examples")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), i])
        return self.combinations[int(rng.integers(len(self.combinations)))]

    def attributes(self, i):
        colour, shape, position = self._combination(i)
        return {"colour": colour, "shape": shape, "position": position}

    def caption(self, i):
        return caption(*self._combination(i))

    def label(self, i):
        colour, shape, _ = self._combination(i)
        return CLASS_NAMES.index(f"{colour} {shape}")

    def image(self, i):
        return render(*self._combination(i), size=self.size)

    def __getitem__(self, i):
        return _example(self.image(i), self.label(i), self.caption(i))

    def mask(self, i):
        """float32 (size, size): 1 on the shape's bounding box, 0 elsewhere."""
        _, shape, position = self._combination(i)
        inside = shape_mask(shape, position, self.size)
        rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
        mask = np.zeros((self.size, self.size), np.float32)
        mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = 1
        return mask

    def low_res(self, i, factor=4):
        """uint8 (size // factor, size // factor, 3): the super-resolution input (`low_resolution`)."""
        small = self.size // factor
        if factor < 1 or small < 1:
            raise ValueError(f"factor {factor} does not fit an image of {self.size} pixels")
        x = self.image(i)[None].astype(np.float32) / 127.5 - 1.0
        x = np.asarray(low_resolution(x, (small, small)))[0]
        return to_uint8(x)

    def describe(self, i):
        return f"shapes[{self.split}, seed {self.seed}, size {self.size}] example {i}: {self.caption(i)!r}"
