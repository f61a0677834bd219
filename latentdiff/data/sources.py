"""Random-access example sources: an image folder, prepared ArrayRecord files, a TFDS dataset.

A source is a sequence: `len(source)` and `source[i]` -> a dict with `image` (encoded bytes or a
uint8 HWC array; `transforms.decode_image` decodes it later, in the loader's workers) and, when the
source has them (`has_labels`, `has_captions`), `class_label` (int) and `caption` (str).
`class_names[label]` names a label where known; `describe(i)` names example i in warnings.
Reading happens in `__getitem__`; constructors only list and validate.
"""
import glob
import importlib
import io
import json
import logging
import os
import posixpath

import numpy as np

from latentdiff.data.transforms import decode_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_FILES = ("captions.jsonl", "captions.tsv", "captions.txt")  # looked for in the folder's root
RECORD_FORMAT = "latentdiff-examples-v1"

log = logging.getLogger(__name__)


def _example(image, class_label=None, caption=None):
    example = {"image": image}
    if class_label is not None:
        example["class_label"] = int(class_label)
    if caption is not None:
        example["caption"] = caption
    return example


def _import(module, install):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed here and is not installed: {install}") from e


# ---------------------------------------------------------------------------- image folder
class ImageFolder:
    """Every image under `root` (sorted relative paths), with labels and captions where present.

    Labels (`labels_from_dirs`): the top-level sub-folder of each image, ids in sorted name order
    (`class_names`); a flat folder has none. Captions: the file `captions` (relative to `root` or
    absolute), else the first of `CAPTION_FILES` in `root`, else `<image stem>.txt` beside the images.
    A caption file holds JSON lines {"file": relpath, "caption": str} (.jsonl) or "relpath<TAB>caption"
    lines; once captions exist, every image must have one.
    """

    def __init__(self, root, captions=None, labels_from_dirs=True):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder {self.root!r} does not exist or is not a directory")
        self.files, texts = _walk(self.root)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root!r}")
        self.class_names, self._labels = _dir_labels(self.root, self.files) if labels_from_dirs else (None, None)
        self._captions = _folder_captions(self.root, self.files, texts, captions)

    has_labels = property(lambda self: self._labels is not None)
    has_captions = property(lambda self: self._captions is not None)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with open(os.path.join(self.root, self.files[i]), "rb") as f:
            data = f.read()
        label = None if self._labels is None else self._labels[i]
        return _example(data, label, None if self._captions is None else self._captions[i])

    def describe(self, i):
        return os.path.join(self.root, self.files[i])


def _walk(root):
    """(sorted image paths, set of .txt paths), relative to root with '/' separators."""
    images, texts = [], set()
    for folder, _, names in os.walk(root):
        rel = os.path.relpath(folder, root).replace(os.sep, "/")
        for name in names:
            path = name if rel == "." else f"{rel}/{name}"
            ext = os.path.splitext(name)[1].lower()
            if ext in IMAGE_EXTENSIONS:
                images.append(path)
            elif ext == ".txt":
                texts.add(path)
    return sorted(images), texts


def _dir_labels(root, files):
    tops = [f.split("/", 1)[0] if "/" in f else None for f in files]
    if all(t is None for t in tops):
        return None, None
    if None in tops:
        raise ValueError(f"{os.path.join(root, files[tops.index(None)])!r} lies in the root of a folder whose "
                         "other images are in class sub-folders; move it into a class folder, or pass "
                         "labels_from_dirs=False")
    names = sorted(set(tops))
    ids = {name: i for i, name in enumerate(names)}
    return names, [ids[t] for t in tops]


def _folder_captions(root, files, texts, captions):
    path = captions
    if path is None:
        path = next((n for n in CAPTION_FILES if os.path.isfile(os.path.join(root, n))), None)
    if path is not None:
        path = os.path.join(root, path)  # an absolute `captions` stays as it is
        table, origin = _read_caption_file(path), path
    else:
        stems = {posixpath.splitext(f)[0] + ".txt": f for f in files}
        table = {stems[t]: _read_text(os.path.join(root, t)) for t in sorted(texts) if t in stems}
        if not table:
            return None
        origin = "the <image>.txt files"
    missing = [f for f in files if f not in table]
    if missing:
        raise ValueError(f"{len(missing)} of {len(files)} images have no caption in {origin} "
                         f"(first: {missing[0]!r}); add captions for them or remove them")
    unused = len(table) - len(files)
    if unused:
        log.warning("%d captions in %s name no image under %s", unused, origin, root)
    return [table[f] for f in files]


def _read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def _read_caption_file(path):
    """{normalised relpath: caption} from a .jsonl or a tab-separated file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption file {path!r} does not exist")
    table = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            if path.endswith(".jsonl"):
                try:
                    entry = json.loads(line)
                    name, caption = entry["file"], entry["caption"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f'{where}: expected {{"file": ..., "caption": ...}} ({e!r})') from None
            else:
                name, tab, caption = line.rstrip("\r\n").partition("\t")
                if not tab:
                    raise ValueError(f"{where}: expected 'relative/path<TAB>caption'")
            key = posixpath.normpath(str(name).replace("\\", "/"))
            if key in table:
                raise ValueError(f"{where}: a second caption for {key!r}")
            table[key] = str(caption).strip()
    return table


# ---------------------------------------------------------------------------- ArrayRecord
class ArrayRecordSource:
    """Examples written by `prepare_array_record`: one ArrayRecord file, a glob or a list of shards.

    Needs `pip install grain` (which brings array_record). `class_names` come from the `<path>.json`
    written beside the file, where present.
    """

    def __init__(self, path):
        if isinstance(path, (str, os.PathLike)):
            path = os.fspath(path)
            paths = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
        else:
            paths = [os.fspath(p) for p in path]
        absent = [p for p in paths if not os.path.isfile(p)]
        if not paths or absent:
            raise FileNotFoundError(f"no ArrayRecord file at {absent[0] if absent else path!r}")
        grain = _import("grain.python", "pip install grain")
        self._msgpack = _import("msgpack", "pip install msgpack")
        self.paths = paths
        self._records = grain.ArrayRecordDataSource(paths)
        if len(self._records) == 0:
            raise ValueError(f"ArrayRecord file(s) {path!r} hold no examples")
        meta = f"{paths[0]}.json"
        self.class_names = None
        if os.path.isfile(meta):
            with open(meta, encoding="utf-8") as f:
                self.class_names = json.load(f).get("class_names")
        first = self[0]
        self.has_labels, self.has_captions = "class_label" in first, "caption" in first

    def __len__(self):
        return len(self._records)

    def __getitem__(self, i):
        record = self._msgpack.unpackb(self._records[i])
        return _example(record["image"], record.get("class_label"), record.get("caption"))

    def describe(self, i):
        return f"record {i} of {', '.join(self.paths)}"


def prepare_array_record(source, out_path):
    """Write `source`'s examples (encoded bytes; arrays become PNG) to one ArrayRecord file.

    Images that do not decode are left out, each with a warning. Writes `<out_path>.json`
    ({format, num_examples, class_names}) beside it. Returns {"written": n, "skipped": [names]}.
    """
    writer_module = _import("array_record.python.array_record_module", "pip install grain")
    msgpack = _import("msgpack", "pip install msgpack")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    writer = writer_module.ArrayRecordWriter(os.fspath(out_path), "group_size:1")
    written, skipped = 0, []
    try:
        for i in range(len(source)):
            try:
                example = source[i]
                image = decode_image(example["image"])
            except Exception as e:  # noqa: BLE001 - any unreadable example is left out and named
                log.warning("leaving out unreadable image %s (%s: %s)", source.describe(i), type(e).__name__, e)
                skipped.append(source.describe(i))
                continue
            if isinstance(example["image"], np.ndarray):
                example["image"] = _png(image)
            writer.write(msgpack.packb(example))
            written += 1
    finally:
        writer.close()
    with open(f"{out_path}.json", "w", encoding="utf-8") as f:
        json.dump({"format": RECORD_FORMAT, "num_examples": written,
                   "class_names": getattr(source, "class_names", None)}, f)
    return {"written": written, "skipped": skipped}


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------- TFDS
class TFDSSource:
    """A prepared TFDS dataset, read with `tfds.data_source` (random access, no TensorFlow needed).

    The dataset must already be in `data_dir` in ArrayRecord format (`tfds build
    --file_format=array_record`); nothing is downloaded. Labels come from `label_key` when the
    dataset has it, captions from `caption_key` when given.
    """

    def __init__(self, name, split="train", data_dir=None, image_key="image", label_key="label",
                 caption_key=None):
        tfds = _import("tensorflow_datasets", "pip install latentdiff[tfds]")
        if not hasattr(tfds, "data_source"):
            raise ImportError("tfds.data_source is missing: pip install -U 'tensorflow-datasets>=4.9'")
        try:
            self._data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:
            where = data_dir or "the default data_dir"
            raise ValueError(f"cannot open TFDS dataset {name!r} split {split!r} in {where}: "
                             f"{e}. It must be prepared there in ArrayRecord format "
                             "(tfds build --file_format=array_record)") from e
        features = self._data.dataset_info.features
        for key in (image_key, caption_key):
            if key is not None and key not in features:
                raise ValueError(f"TFDS dataset {name!r} has no feature {key!r}; it has {sorted(features.keys())}")
        self.name, self.image_key, self.caption_key = f"{name}[{split}]", image_key, caption_key
        self.label_key = label_key if label_key is not None and label_key in features else None
        self.class_names = getattr(features[self.label_key], "names", None) if self.label_key else None
        self.has_labels, self.has_captions = self.label_key is not None, caption_key is not None

    def __len__(self):
        return len(self._data)

    def __getitem__(self, i):
        record = self._data[i]
        caption = record[self.caption_key] if self.caption_key else None
        caption = caption.decode("utf-8") if isinstance(caption, bytes) else caption
        return _example(record[self.image_key], record[self.label_key] if self.label_key else None, caption)

    def describe(self, i):
        return f"example {i} of TFDS {self.name}"
