"""A deterministic, resumable, per-process batch iterator over a random-access source.

Epoch e visits `permutation(seed, e)` of the source, cut into global batches of P x b examples
(P processes, b per process); process p takes the p-th b of each, so the global batches, in order,
are the same for any process count (the last `len % P` examples of each permutation are left
out; what no full global batch holds is split into P equal parts). A batch that a process's share
cannot fill is dropped (`drop_remainder`).
Every example's augmentation is drawn from (seed, epoch, index), so a loader restored with
`set_state(get_state())` yields bit-identical batches, whatever `num_workers` is.
"""
import collections
import concurrent.futures
import logging

import numpy as np

from latentdiff.data.transforms import Preprocess, decode_image, example_rng

_PERMUTATION = 0  # seed-sequence domain tag; per-example generators use 1 (transforms.example_rng)

log = logging.getLogger(__name__)


class _Unreadable(Exception):
    """An example whose read or decode failed."""


class Loader:
    """Batches of `source` for one process: dicts of numpy arrays (see the package docstring).

    `transform(pil_rgb_image, rng) -> float32 HWC` defaults to `Preprocess()`. `num_epochs=None`
    iterates forever. `num_workers > 0` reads and decodes in that many threads, `prefetch` batches
    ahead, in the same order and with the same results as `num_workers=0`. Unreadable examples are
    skipped, replaced by the next ones, counted in `skipped` and logged with their name.
    """

    def __init__(self, source, batch_size_per_process, process_index=0, process_count=1, seed=0, transform=None,
                 *, shuffle=True, drop_remainder=True, num_epochs=None, num_workers=0, prefetch=2):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if batch_size_per_process < 1 or num_workers < 0 or prefetch < 1:
            raise ValueError(f"need batch_size_per_process >= 1, num_workers >= 0, prefetch >= 1; got "
                             f"{batch_size_per_process}, {num_workers}, {prefetch}")
        self.num_examples = len(source)
        self.share = self.num_examples // process_count
        if self.share < batch_size_per_process:
            raise ValueError(f"batch_size_per_process {batch_size_per_process} is larger than this process's share of "
                             f"the data ({self.num_examples} examples over {process_count} processes = {self.share})")
        self.source, self.batch_size, self.seed = source, batch_size_per_process, int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.transform = Preprocess() if transform is None else transform
        self.shuffle, self.drop_remainder, self.num_epochs = shuffle, drop_remainder, num_epochs
        self.num_workers, self.prefetch = num_workers, prefetch
        self.skipped = 0
        self._epoch, self._position, self._order = 0, 0, None
        self._pending = collections.deque()  # futures of positions _position.. of this epoch
        self._pool = None
        self._failures_in_a_row = 0

    @property
    def steps_per_epoch(self):
        """Batches per epoch when every example is readable."""
        full, rest = divmod(self.share, self.batch_size)
        return full + (0 if self.drop_remainder or not rest else 1)

    # ------------------------------------------------------------------ state
    def get_state(self):
        """Plain ints: where the next batch starts, the skip count, and the shape of the split."""
        return {"epoch": self._epoch, "position": self._position, "skipped": self.skipped,
                "num_examples": self.num_examples, "process_count": self.process_count}

    def set_state(self, state):
        """Continue exactly where the loader that wrote `state` (with `get_state`) stopped."""
        for key in ("num_examples", "process_count"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state[key]}, this loader has "
                                 f"{getattr(self, key)}: its position does not apply here; start the loader afresh")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.share:
            raise ValueError(f"loader state {state} is out of range (position must be in [0, {self.share}])")
        self._reset()
        self._epoch, self._position = epoch, position
        self.skipped = int(state.get("skipped", 0))

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        return self

    def __next__(self):
        while self.num_epochs is None or self._epoch < self.num_epochs:
            batch = self._next_in_epoch()
            if batch is not None:
                return batch
            self._reset()
            self._epoch, self._position = self._epoch + 1, 0
        raise StopIteration

    def close(self):
        """Stop the worker threads (a later batch starts them again)."""
        self._reset()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _next_in_epoch(self):
        """The next batch of this epoch, or None at its end."""
        examples, position = [], self._position
        try:
            while len(examples) < self.batch_size and position < self.share:
                try:
                    examples.append(self._result(position))
                    self._failures_in_a_row = 0
                except _Unreadable as e:
                    self._skip(e)
                position += 1
        except BaseException:
            self._reset()  # the read-ahead no longer matches `_position`, which stays at this batch's start
            raise
        self._position = position
        if not examples or (len(examples) < self.batch_size and self.drop_remainder):
            return None
        return self._collate(examples)

    def _skip(self, error):
        self.skipped += 1
        self._failures_in_a_row += 1
        log.warning("skipping unreadable image %s (%d skipped so far)", error, self.skipped)
        if self._failures_in_a_row >= self.share:
            raise RuntimeError(f"{self._failures_in_a_row} unreadable examples in a row, a whole epoch's worth; "
                               f"the last: {error}")

    def _order_of_epoch(self):
        if self._order is None:
            if self.shuffle:
                rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._epoch, _PERMUTATION]))
                order = rng.permutation(self.num_examples)
            else:
                order = np.arange(self.num_examples)
            p, n, b = self.process_index, self.process_count, self.batch_size
            full = self.share // b  # global batches of n * b
            rest = order[full * n * b:self.share * n]
            self._order = np.concatenate([order[:full * n * b].reshape(full, n, b)[:, p].ravel(),
                                          rest[p * (len(rest) // n):(p + 1) * (len(rest) // n)]])
        return self._order

    def _result(self, position):
        """Example at `position` of this epoch's share (raises _Unreadable)."""
        if self.num_workers == 0:
            result = self._load(self._epoch, int(self._order_of_epoch()[position]))
        else:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.num_workers, "latentdiff-data")
            order, window = self._order_of_epoch(), self.prefetch * self.batch_size
            next_position = position + len(self._pending)
            while len(self._pending) < window and next_position < self.share:
                self._pending.append(self._pool.submit(self._load, self._epoch, int(order[next_position])))
                next_position += 1
            result = self._pending.popleft().result()
        if isinstance(result, _Unreadable):
            raise result
        return result

    def _load(self, epoch, index):
        """(index, image, raw example) or _Unreadable; runs in a worker thread when there are some."""
        try:
            example = self.source[index]
            image = decode_image(example["image"])
        except Exception as e:  # noqa: BLE001 - a corrupt or vanished file must not stop training
            return _Unreadable(f"{self.source.describe(index)} ({type(e).__name__}: {e})")
        return index, self.transform(image, example_rng(self.seed, epoch, index)), example

    def _collate(self, examples):
        indices, images, raw = zip(*examples)
        batch = {"image": np.stack(images).astype(np.float32, copy=False),
                 "index": np.asarray(indices, np.int32)}
        if self.source.has_labels:
            batch["class_label"] = np.asarray([r["class_label"] for r in raw], np.int32)
        if self.source.has_captions:
            batch["caption"] = np.asarray([r["caption"] for r in raw], np.str_)
        return batch

    def _reset(self):
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._order = None
