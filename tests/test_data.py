"""Input pipeline: sources, the paper's preprocessing, sharding, exact resumption, corrupt files."""
import io
import json
import logging
import sys

import numpy as np
import pytest
from PIL import Image

from latentdiff.data import (ArrayRecordSource, ImageFolder, Loader, Preprocess, TFDSSource, make_dataset,
                             prepare_array_record)
from latentdiff.data.transforms import decode_image, example_rng

SIZE = 8


def _save(path, rng, shape, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
    """cat/ (5 png), dog/ (6 jpg + 1 corrupt jpg), captions.jsonl for all 12 files."""
    rng = np.random.default_rng(0)
    root = tmp_path / "classes"
    files = [f"cat/c{i}.png" for i in range(5)] + [f"dog/d{i}.jpg" for i in range(6)]
    for i, name in enumerate(files):
        _save(root / name, rng, (10 + i, 14 - i % 3, 3))
    (root / "dog/d9_broken.jpg").write_bytes(_encoded(rng, "JPEG")[:100])
    files.append("dog/d9_broken.jpg")
    with open(root / "captions.jsonl", "w") as f:
        for name in files:
            f.write(json.dumps({"file": name, "caption": f"a photo of {name}"}) + "\n")
    return root


@pytest.fixture
def flat(tmp_path):
    """16 readable images, no labels, no captions."""
    rng = np.random.default_rng(1)
    for i in range(16):
        _save(tmp_path / "flat" / f"{i:02d}.png", rng, (9 + i % 4, 11, 3))
    return tmp_path / "flat"


def _encoded(rng, fmt, shape=(12, 12, 3)):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def _loader(source, batch_size=3, **kwargs):
    kwargs.setdefault("transform", Preprocess(SIZE, random_crop=True, random_flip=True))
    return Loader(source, batch_size, **kwargs)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


# ---------------------------------------------------------------------------- sources
def test_image_folder_labels_and_captions(folder, tmp_path):
    source = ImageFolder(folder)
    assert len(source) == 12 and source.files[0] == "cat/c0.png" and source.files == sorted(source.files)
    assert source.class_names == ["cat", "dog"] and source.has_labels and source.has_captions
    for i, name in enumerate(source.files):
        example = source[i]
        assert example["class_label"] == (0 if name.startswith("cat/") else 1)
        assert example["caption"] == f"a photo of {name}"
    assert not ImageFolder(folder, labels_from_dirs=False).has_labels

    tsv = tmp_path / "caps.tsv"
    tsv.write_text("".join(f"./{name}\tcaption {i}\n" for i, name in enumerate(source.files)))
    assert ImageFolder(folder, captions=str(tsv))[3]["caption"] == "caption 3"

    flat = tmp_path / "per_image"
    rng = np.random.default_rng(2)
    for i in range(3):
        _save(flat / f"{i}.webp", rng, (8, 8, 3), fmt="WEBP")
        (flat / f"{i}.txt").write_text(f" text {i}\n")
    flat_source = ImageFolder(flat)
    assert not flat_source.has_labels
    assert [flat_source[i]["caption"] for i in range(3)] == [f"text {i}" for i in range(3)]


def test_preprocess_is_the_papers(folder):
    image = decode_image((folder / "cat/c1.png").read_bytes())
    array = np.asarray(image)
    h, w = array.shape[:2]
    crop = min(h, w)
    square = array[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2]  # ldm/data/lsun.py
    expected = np.asarray(Image.fromarray(square).resize((SIZE, SIZE), Image.BICUBIC)) / 127.5 - 1.0
    got = Preprocess(SIZE)(image, example_rng(0, 0, 0))
    assert got.dtype == np.float32 and got.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(got, expected.astype(np.float32))
    flips = [Preprocess(SIZE, random_flip=True)(image, example_rng(0, 0, i)) for i in range(40)]
    flipped = [bool(np.array_equal(f, got[:, ::-1])) for f in flips]
    assert all(f or np.array_equal(x, got) for f, x in zip(flipped, flips)) and 5 < sum(flipped) < 35


# ---------------------------------------------------------------------------- batches
def test_batches_shapes_dtypes_and_contents(folder):
    source = ImageFolder(folder)
    with _loader(source, 4, num_epochs=1, num_workers=2) as loader:
        batches = list(loader)
    assert loader.steps_per_epoch == 3 and len(batches) == 2  # 11 readable of 12: the third cannot fill
    for batch in batches:
        assert batch["image"].dtype == np.float32 and batch["image"].shape == (4, SIZE, SIZE, 3)
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].std() > 0.1
        assert batch["class_label"].dtype == np.int32 and batch["class_label"].shape == (4,)
        for i, label, caption in zip(batch["index"], batch["class_label"], batch["caption"]):
            assert label == source[i]["class_label"] and caption == f"a photo of {source.files[i]}"


def test_unlabelled_uncaptioned_batches(flat):
    batch = next(_loader(ImageFolder(flat), 2))
    assert sorted(batch) == ["image", "index"] and batch["index"].dtype == np.int32


def test_processes_get_disjoint_equal_shares_covering_the_epoch(flat):
    source = ImageFolder(flat)
    shares = [np.concatenate([b["index"] for b in _loader(source, 4, process_index=p, process_count=2, num_epochs=1)])
              for p in range(2)]
    assert len(shares[0]) == len(shares[1]) == 8 and not set(shares[0]) & set(shares[1])
    assert sorted(np.concatenate(shares)) == list(range(16))
    thirds = [next(_loader(source, 5, process_index=p, process_count=3, seed=5))["index"] for p in range(3)]
    assert len(set(np.concatenate(thirds))) == 15  # 16 // 3 = 5 each, disjoint; one left out this epoch


def test_resume_is_bit_identical(folder):
    source = ImageFolder(folder)
    reference = _take(_loader(source, seed=7), 12)  # 3 batches an epoch: crosses three epoch ends
    for stop in (1, 2, 5):
        first = _loader(source, seed=7)
        _take(first, stop)
        state = json.loads(json.dumps(first.get_state()))
        assert all(type(v) is int for v in state.values())
        resumed = _loader(source, seed=7, num_workers=3, prefetch=1)
        resumed.set_state(state)
        _assert_same(_take(resumed, 12 - stop), reference[stop:])
        resumed.close()


def test_workers_and_runs_are_deterministic_and_seeded(folder):
    source = ImageFolder(folder)
    plain = _take(_loader(source, seed=3), 6)
    _assert_same(_take(_loader(source, seed=3, num_workers=4), 6), plain)
    _assert_same(_take(_loader(ImageFolder(folder), seed=3), 6), plain)
    other = _take(_loader(source, seed=4), 6)
    assert not np.array_equal(np.concatenate([b["index"] for b in other]), np.concatenate([b["index"] for b in plain]))
    unshuffled = _take(_loader(source, seed=3, shuffle=False), 1)[0]
    assert list(unshuffled["index"]) == [0, 1, 2]


def test_corrupt_image_is_skipped_counted_and_named(folder, caplog):
    source = ImageFolder(folder)
    broken = source.files.index("dog/d9_broken.jpg")
    loader = _loader(source, 5, shuffle=False, process_count=1)
    with caplog.at_level(logging.WARNING, logger="latentdiff.data.loader"):
        batches = _take(loader, 4)  # two batches an epoch; the corrupt file is the last one
    assert all(len(b["index"]) == 5 for b in batches) and broken not in np.concatenate([b["index"] for b in batches])
    assert loader.skipped == 1 and loader.get_state()["skipped"] == 1
    assert "d9_broken.jpg" in caplog.text
    shuffled = _loader(source, 11, seed=1)
    batch = next(shuffled)
    assert shuffled.skipped == 1 and sorted(batch["index"]) == [i for i in range(12) if i != broken]


# ---------------------------------------------------------------------------- config and errors
def test_make_dataset(folder):
    config = {"source": "folder", "root": str(folder), "batch_size": 4, "size": SIZE, "random_flip": True,
              "num_workers": 2}
    loaders = [make_dataset(config, p, 2, seed=1) for p in range(2)]
    assert loaders[0].batch_size == 2 and loaders[0].transform == Preprocess(SIZE, False, True)
    batches = [next(loader) for loader in loaders]
    assert batches[0]["image"].shape == (2, SIZE, SIZE, 3) and not set(batches[0]["index"]) & set(batches[1]["index"])
    with pytest.raises(ValueError, match=r"unknown data source 'lmdb'.*'array_record', 'folder', 'shapes', 'tfds'"):
        make_dataset({**config, "source": "lmdb"})
    with pytest.raises(ValueError, match=r"unknown data config key\(s\) \['sise'\].*valid keys: .*'size'"):
        make_dataset({**config, "sise": 3})
    with pytest.raises(ValueError, match=r"lacks \['root'\]"):
        make_dataset({k: v for k, v in config.items() if k != "root"})
    with pytest.raises(ValueError, match="not divisible by the process count 3"):
        make_dataset(config, 0, 3)


def test_errors(folder, flat, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="batch_size_per_process 9 is larger than this process's share.*= 8"):
        Loader(ImageFolder(flat), 9, 0, 2)
    with pytest.raises(ValueError, match="process_index 2 is not in"):
        Loader(ImageFolder(flat), 1, 2, 2)
    with pytest.raises(ValueError, match="size must be a positive int"):
        Preprocess(0)
    (folder / "dog" / "d0.txt").write_text("ignored: the jsonl wins")
    (folder / "cat" / "c5.png").write_bytes((folder / "cat" / "c0.png").read_bytes())
    with pytest.raises(ValueError, match=r"1 of 13 images have no caption in .*captions.jsonl \(first: 'cat/c5.png'\)"):
        ImageFolder(folder)
    (folder / "loose.png").write_bytes((folder / "cat" / "c0.png").read_bytes())
    with pytest.raises(ValueError, match="loose.png.*labels_from_dirs=False"):
        ImageFolder(folder, captions=None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file": "a.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 1: expected"):
        ImageFolder(flat, captions=str(bad))
    for i in range(2):
        (tmp_path / "all_bad" / f"{i}.png").parent.mkdir(exist_ok=True)
        (tmp_path / "all_bad" / f"{i}.png").write_bytes(b"not an image")
    with pytest.raises(RuntimeError, match="2 unreadable examples in a row"):
        next(Loader(ImageFolder(tmp_path / "all_bad"), 1))
    loader = Loader(ImageFolder(flat), 2, 0, 2)
    with pytest.raises(ValueError, match="process_count=1, this loader has 2"):
        loader.set_state(Loader(ImageFolder(flat), 2).get_state())
    with pytest.raises(ValueError, match="out of range"):
        loader.set_state({"epoch": 0, "position": 9})


def test_missing_optional_packages_say_what_to_install(monkeypatch, flat, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install latentdiff\[tfds\]"):
        TFDSSource("mnist", "train")
    path = tmp_path / "x.array_record"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "grain", None)
    monkeypatch.setitem(sys.modules, "grain.python", None)
    with pytest.raises(ImportError, match="pip install grain"):
        ArrayRecordSource(str(path))


# ---------------------------------------------------------------------------- optional back ends
def test_array_record_round_trip(folder, tmp_path):
    pytest.importorskip("array_record")
    pytest.importorskip("grain")
    source = ImageFolder(folder)
    out = tmp_path / "prepared" / "train.array_record"
    report = prepare_array_record(source, str(out))
    assert report["written"] == 11 and report["skipped"] == [str(folder / "dog/d9_broken.jpg")]
    records = ArrayRecordSource(str(out))
    assert len(records) == 11 and records.class_names == ["cat", "dog"] and records.has_captions
    assert records[4] == {"image": (folder / "cat/c4.png").read_bytes(), "class_label": 0,
                          "caption": "a photo of cat/c4.png"}
    batch = next(_loader(records, 11, seed=2))
    reference = next(_loader(source, 11, seed=2, shuffle=False))  # same 11 readable images
    order = np.argsort(batch["index"])
    np.testing.assert_array_equal(batch["class_label"][order], reference["class_label"])
    with pytest.raises(FileNotFoundError, match="no ArrayRecord file"):
        ArrayRecordSource(str(tmp_path / "missing.array_record"))


def test_tfds_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(3)

    class Tiny(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"]), "text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):  # encoded file objects: building needs no TensorFlow
                yield i, {"image": io.BytesIO(_encoded(rng, "PNG", (10, 12 + i, 3))), "label": i % 3, "text": f"t{i}"}

    try:
        Tiny(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    except ImportError as e:
        pytest.skip(f"cannot build a TFDS dataset here: {e}")
    source = TFDSSource("tiny", "train", str(tmp_path), caption_key="text")
    assert len(source) == 6 and source.class_names == ["a", "b", "c"]
    batch = next(_loader(source, 3, shuffle=False))
    assert batch["image"].shape == (3, SIZE, SIZE, 3) and list(batch["caption"]) == [
        source[i]["caption"] for i in batch["index"]]
    with pytest.raises(ValueError, match="has no feature 'caption'"):
        TFDSSource("tiny", "train", str(tmp_path), caption_key="caption")
    with pytest.raises(ValueError, match="cannot open TFDS dataset 'absent'"):
        TFDSSource("absent", "train", str(tmp_path))


def test_global_batches_do_not_depend_on_the_process_count(flat):
    source = ImageFolder(flat)
    one = [b["index"] for b in _loader(source, 6, num_epochs=1, seed=3)]
    two = [[b["index"] for b in _loader(source, 3, process_index=p, process_count=2, num_epochs=1, seed=3)]
           for p in range(2)]
    assert len(one) == len(two[0]) == 2
    for k, batch in enumerate(one):
        np.testing.assert_array_equal(np.concatenate([two[0][k], two[1][k]]), batch)
