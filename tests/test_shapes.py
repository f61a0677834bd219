"""The built-in `shapes` dataset and the prompt-adherence evaluator."""
import numpy as np
import pytest
from PIL import Image

from latentdiff.data import SOURCES, make_dataset
from latentdiff.data.shapes import (BACKGROUND, CLASS_NAMES, COMBINATIONS, HELDOUT, TRAIN, ShapesSource, caption, render,
                                    combination_index)
from latentdiff.data.transforms import decode_image
from latentdiff.evaluate import adherence, classify, format_table, parse_prompt


def _combos(source):
    return {tuple(source.attributes(i).values()) for i in range(len(source))}


def test_deterministic_and_seeded():
    a, b = ShapesSource(num_examples=50, seed=3), ShapesSource(num_examples=50, seed=3)
    for i in range(50):
        x, y = a[i], b[i]
        np.testing.assert_array_equal(x["image"], y["image"])
        assert (x["class_label"], x["caption"]) == (y["class_label"], y["caption"])
    other = ShapesSource(num_examples=50, seed=4)
    assert [a.caption(i) for i in range(50)] != [other.caption(i) for i in range(50)]
    assert a[0]["image"].dtype == np.uint8 and a[0]["image"].shape == (32, 32, 3)
    assert ShapesSource(size=64, num_examples=1)[0]["image"].shape == (64, 64, 3)
    with pytest.raises(IndexError):
        a[50]


def test_captions_labels_and_attributes_agree():
    source = ShapesSource(num_examples=200)
    assert len(CLASS_NAMES) == 12 and source.has_labels and source.has_captions
    for i in range(200):
        example, attributes = source[i], source.attributes(i)
        assert set(attributes) == {"colour", "shape", "position"}
        assert example["caption"] == caption(**attributes)
        assert CLASS_NAMES[example["class_label"]] == f"{attributes['colour']} {attributes['shape']}"
        assert parse_prompt(example["caption"]) == attributes
    assert caption("red", "circle", "top left") == "a red circle at the top left"
    assert caption("blue", "square", "center") == "a blue square in the center"


def test_splits_are_disjoint():
    assert len(COMBINATIONS) == 60 and len(HELDOUT) == 9 and not set(TRAIN) & set(HELDOUT)
    assert all(combination_index(*c) % 7 == 3 for c in HELDOUT)
    train = _combos(ShapesSource(num_examples=2000, split="train"))
    heldout = _combos(ShapesSource(num_examples=300, split="heldout"))
    assert train == set(TRAIN) and heldout == set(HELDOUT)
    with pytest.raises(ValueError, match="split"):
        ShapesSource(split="test")


def test_mask_and_low_res():
    source = ShapesSource(size=32, num_examples=20)
    for i in range(20):
        mask, image = source.mask(i), source.image(i)
        assert mask.dtype == np.float32 and mask.shape == (32, 32) and set(np.unique(mask)) == {0.0, 1.0}
        shape = np.any(image != BACKGROUND, axis=-1)
        assert np.all(mask[shape] == 1) and 0.15 < mask.mean() <= 0.3
        rows, cols = np.nonzero(mask)
        assert shape[rows.min()].any() and shape[rows.max()].any() and shape[:, cols.min()].any()
    small = source.low_res(0, factor=4)
    assert small.dtype == np.uint8 and small.shape == (8, 8, 3)


def test_loader_through_make_dataset():
    assert SOURCES["shapes"] is ShapesSource
    loader = make_dataset({"source": "shapes", "size": 32, "num_examples": 40, "split": "heldout",
                           "batch_size": 8, "num_epochs": 1})
    batches = list(loader)
    assert len(batches) == 5
    batch = batches[0]
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert -1 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["class_label"].shape == (8,) and batch["caption"].shape == (8,)
    source = loader.source
    for index, label, text in zip(batch["index"], batch["class_label"], batch["caption"]):
        assert (label, text) == (source.label(index), source.caption(index))
        assert tuple(source.attributes(index).values()) in HELDOUT
    np.testing.assert_array_equal(np.asarray(decode_image(source[0]["image"])), source.image(0))


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_evaluator_reads_clean_images(size, split):
    source = ShapesSource(size=size, num_examples=120, split=split)
    for i in range(len(source)):
        assert classify(source.image(i)) == source.attributes(i), source.describe(i)
    images = np.stack([source.image(i) for i in range(len(source))])
    prompts = [source.caption(i) for i in range(len(source))]
    assert adherence(images, prompts) == {"colour": 1.0, "shape": 1.0, "position": 1.0, "all": 1.0}


def test_evaluator_every_combination_and_wrong_prompts():
    from latentdiff.data.shapes import render
    for size in (32, 64):
        for combo in COMBINATIONS:
            assert tuple(classify(render(*combo, size=size)).values()) == combo
    image = render("red", "circle", "top left")[None]
    assert adherence(image, ["a red circle at the top left"])["all"] == 1.0
    assert adherence(image, ["a blue circle at the top left"]) == {"colour": 0.0, "shape": 1.0, "position": 1.0,
                                                                   "all": 0.0}
    assert adherence(image, ["a red triangle in the center"]) == {"colour": 1.0, "shape": 0.0, "position": 0.0,
                                                                  "all": 0.0}
    blank = np.full((1, 32, 32, 3), 210, np.uint8)
    assert classify(blank[0]) == {"colour": None, "shape": None, "position": None}
    assert adherence(blank, ["a red circle at the top left"])["all"] == 0.0
    with pytest.raises(ValueError, match="a purple blob"):
        adherence(image, ["a purple blob"])
    with pytest.raises(ValueError, match="2 colours"):
        parse_prompt("a red and blue circle in the center")


@pytest.mark.parametrize("size", [32, 64])
def test_evaluator_tolerates_noise(size):
    source = ShapesSource(size=size, num_examples=200, seed=1)
    rng = np.random.default_rng(0)
    images = np.stack([source.image(i) for i in range(len(source))]).astype(np.float64)
    noisy = np.clip(np.round(images + rng.normal(0, 10, images.shape)), 0, 255).astype(np.uint8)
    scores = adherence(noisy, [source.caption(i) for i in range(len(source))])
    assert scores["all"] >= 0.95, scores


def test_format_table():
    table = format_table({1.0: {"colour": 0.5, "shape": 0.25, "position": 1.0, "all": 0.125},
                          7.5: {"colour": 1.0, "shape": 0.75, "position": 1.0, "all": 0.75}})
    lines = table.splitlines()
    assert lines[0].split() == ["guidance", "colour", "shape", "position", "all"]
    assert lines[2].split() == ["1.0", "0.500", "0.250", "1.000", "0.125"] and len(lines) == 4


def test_classifier_tolerates_blurred_edges_and_scores_attribute_dicts():
    from PIL import ImageFilter

    from latentdiff.evaluate import recognised

    combos = COMBINATIONS
    blurred = [np.asarray(Image.fromarray(render(*c)).filter(ImageFilter.GaussianBlur(0.6))) for c in combos]
    assert adherence(blurred, [caption(*c) for c in combos])["all"] == 1.0
    wanted = [{"colour": c, "shape": s} for c, s, _ in combos]
    assert adherence(blurred, wanted) == {"colour": 1.0, "shape": 1.0, "all": 1.0}
    wrong = [{"colour": "red", "shape": "square"}] * len(combos)
    assert adherence(blurred, wrong)["all"] == pytest.approx(5 / 60)
    assert recognised([render(*c) for c in combos]) == 1.0
    noise = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert recognised(noise) == 0.0
