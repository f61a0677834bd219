"""Sample a latent diffusion model: `python sample.py [--config=configs/sample.py] [--config.KEY=VALUE ...]`.

With no flags it samples the built-in demo (`workdir/demo`, written by `python train.py`) on its
held-out prompts. `configs/sample.py` lists every setting. Bad input (no checkpoint, a prompt word the
vocabulary lacks, an image or mask that does not fit) is a one-line error with exit status 2.
"""
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "sample.py")
FLAGS = flags.FLAGS


def _define_flags():
    """After check_argv: config_flags reads the default config and its overrides when defined."""
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Sampling settings (get_config()).", lock_config=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from latentdiff.runtime import enable_compile_cache, initialize_distributed

    process, _ = initialize_distributed(FLAGS.config.get("distributed"))  # before any device is touched
    enable_compile_cache()
    from latentdiff.sampling import UserInputError, run

    try:
        paths = run(FLAGS.config)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if process == 0:
        print(f"wrote {len(paths) - 1} images and {paths[-1]}")


if __name__ == "__main__":
    from latentdiff.config_overrides import run_main

    run_main(main, sys.argv, DEFAULT_CONFIG, _define_flags)
