"""Train an autoencoder or an LDM: `python train.py --config=configs/<name>.py --workdir=DIR`.

Any config key can be overridden: `--config.optim.lr=1e-4`; an unknown key is an error that lists
the valid ones. Running again with the same --workdir resumes from its newest checkpoint.
"""
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.py")
FLAGS = flags.FLAGS


def _define_flags():
    """After check_argv: config_flags reads the default config and its overrides when defined."""
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file (get_config()).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    from latentdiff.training import train_and_evaluate
    from latentdiff.runtime import enable_compile_cache, initialize_distributed

    initialize_distributed(FLAGS.config.get("distributed"))
    enable_compile_cache()

    workdir = FLAGS.workdir or f"workdir/{FLAGS.config.name or FLAGS.config.stage}"
    train_and_evaluate(FLAGS.config, workdir)


if __name__ == "__main__":
    from latentdiff.config_overrides import run_main

    run_main(main, sys.argv, DEFAULT_CONFIG, _define_flags)
