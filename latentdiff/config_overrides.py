"""Check `--config.a.b=v` overrides before absl parses them, so a typo names the valid keys."""
import importlib.util
import os
import sys


def load_config_file(path):
    """Import a config file and return its get_config() (the repo root on sys.path)."""
    spec = importlib.util.spec_from_file_location("_latentdiff_config", path)
    module = importlib.util.module_from_spec(spec)
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)
    spec.loader.exec_module(module)
    return module.get_config()


def unknown_key_error(config, dotted):
    """None if `dotted` ('optim.lr') is a key of `config`, else a message naming the valid keys."""
    node, walked = config, []
    for part in dotted.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            where = ".".join(walked) or "the config"
            return (f"unknown config key '{dotted}': '{part}' is not in {where}; valid keys there: "
                    f"{', '.join(sorted(keys))}")
        node, walked = node[part], walked + [part]
    return None


def check_argv(argv, default_config):
    """Exit with status 2 and a one-line message for any unknown `--config.*` override."""
    path = default_config
    for arg in argv[1:]:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if not os.path.exists(path):
        sys.exit(f"error: config file not found: {path}")
    config = load_config_file(path)
    for arg in argv[1:]:
        if arg.startswith("--config.") and "=" in arg:
            msg = unknown_key_error(config, arg[len("--config."):].split("=", 1)[0])
            if msg:
                sys.stderr.write(f"error: {msg}\n")
                sys.exit(2)


def run_main(main, argv, default_config, define_flags):
    """Check the overrides, define the flags (config_flags reads the config then), run `main` with
    absl; Ctrl-C exits with 130 and no traceback."""
    from absl import app

    check_argv(argv, default_config)
    define_flags()
    try:
        app.run(main, argv)
    except KeyboardInterrupt:
        sys.exit(130)
