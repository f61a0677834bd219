"""Training input: sources (image folder, ArrayRecord, TFDS), the paper's preprocessing, a loader.

A batch is a dict of numpy arrays for one process:
  image        float32 (B, H, W, 3) in [-1, 1], NHWC
  index        int32 (B,), the examples' indices in the source
  class_label  int32 (B,), when the source has labels
  caption      str array (B,), when the source has captions

`make_dataset(config, process_index, process_count, seed)` builds a `Loader` from a config such as
  {"source": "folder", "root": "/data/bedrooms", "batch_size": 64, "size": 256, "random_flip": True}
where `source` is one of `SOURCES`, the other keys are that source's arguments, `Preprocess`'s fields
(size, random_crop, random_flip), `Loader`'s keyword arguments, and `batch_size`: the global batch,
split evenly over the processes.
"""
import inspect

from latentdiff.data.loader import Loader
from latentdiff.data.shapes import ShapesSource
from latentdiff.data.sources import ArrayRecordSource, ImageFolder, TFDSSource, prepare_array_record
from latentdiff.data.transforms import Preprocess, decode_image, example_rng

SOURCES = {"folder": ImageFolder, "array_record": ArrayRecordSource, "tfds": TFDSSource, "shapes": ShapesSource}

__all__ = ["SOURCES", "ArrayRecordSource", "ImageFolder", "Loader", "Preprocess", "TFDSSource",
           "decode_image", "example_rng", "make_dataset", "prepare_array_record"]


def _parameters(fn, kinds):
    """{name: is_required} of `fn`'s parameters of the given kinds."""
    return {name: p.default is p.empty for name, p in inspect.signature(fn).parameters.items()
            if p.kind in kinds and name != "self"}


def make_dataset(config, process_index=0, process_count=1, seed=0):
    """The `Loader` that `config` (a dict or ConfigDict, see the module docstring) describes."""
    config = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    kind = config.pop("source", None)
    if kind not in SOURCES:
        raise ValueError(f"unknown data source {kind!r}; expected one of {sorted(SOURCES)}")
    positional = (inspect.Parameter.POSITIONAL_OR_KEYWORD,)
    groups = {"source": _parameters(SOURCES[kind], positional),
              "transform": _parameters(Preprocess, positional),
              "loader": _parameters(Loader, (inspect.Parameter.KEYWORD_ONLY,)),
              "batch": {"batch_size": True}}
    valid = {name for group in groups.values() for name in group}
    unknown = sorted(set(config) - valid)
    if unknown:
        raise ValueError(f"unknown data config key(s) {unknown} for source {kind!r}; valid keys: "
                         f"{sorted(valid | {'source'})}")
    missing = sorted(name for group in groups.values() for name, required in group.items()
                     if required and name not in config)
    if missing:
        raise ValueError(f"data config for source {kind!r} lacks {missing}")
    args = {group: {k: v for k, v in config.items() if k in names} for group, names in groups.items()}
    batch_size = args["batch"]["batch_size"]
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by the process count {process_count}")
    return Loader(SOURCES[kind](**args["source"]), batch_size // process_count, process_index, process_count,
                  seed, Preprocess(**args["transform"]), **args["loader"])
