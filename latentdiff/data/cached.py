"""A resumable batch iterator over in-memory arrays (the LDM stage's latent cache)."""
import numpy as np


class CachedLoader:
    """Shuffled batches of `arrays` (dict of equal-length arrays), epoch permutations from the seed.

    `get_state()` / `set_state()` hold plain ints, like `Loader`, so checkpoints resume exactly.
    """

    def __init__(self, arrays, batch_size, seed=0):
        self.arrays = arrays
        self.num_examples = len(next(iter(arrays.values())))
        if batch_size > self.num_examples:
            raise ValueError(f"batch size {batch_size} is larger than the {self.num_examples} cached examples")
        self.batch_size, self.seed = batch_size, int(seed)
        self.skipped, self._epoch, self._position = 0, 0, 0

    def _order(self):
        return np.random.default_rng([self.seed, 2, self._epoch]).permutation(self.num_examples)

    def __iter__(self):
        return self

    def __next__(self):
        if self._position + self.batch_size > self.num_examples:
            self._epoch, self._position = self._epoch + 1, 0
        idx = self._order()[self._position:self._position + self.batch_size]
        self._position += self.batch_size
        return {k: v[idx] for k, v in self.arrays.items()}

    def get_state(self):
        return {"epoch": self._epoch, "position": self._position, "num_examples": self.num_examples}

    def set_state(self, state):
        if state.get("num_examples") != self.num_examples:
            raise ValueError(f"the checkpoint's data position is for {state.get('num_examples')} examples, "
                             f"the latent cache holds {self.num_examples}")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
