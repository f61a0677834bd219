"""Training: state, pure train steps, the loops."""
import json
import os


def train_and_evaluate(config, workdir):
    """Run the stage `config.stage` ('ldm' or 'autoencoder') in `workdir`.

    An LDM config with an `autoencoder` section trains that first stage first, into
    `model.first_stage_config.checkpoint`, unless an autoencoder is already exported there. A config
    with `evaluate.guidance_scales` on the built-in `shapes` data ends with `training.report`.
    """
    if config.stage == "autoencoder":
        from latentdiff.training.autoencoder_loop import train_autoencoder

        return train_autoencoder(config, workdir)
    if config.stage != "ldm":
        raise ValueError(f"unknown config.stage '{config.stage}': 'ldm' or 'autoencoder'")
    from latentdiff.training.loop import train_ldm

    if "autoencoder" in config:
        train_first_stage(config)
    result = train_ldm(config, workdir)
    if config.evaluate.guidance_scales:
        from latentdiff.training.report import report

        report(config, workdir)
    return result


def train_first_stage(config):
    """Train `config.autoencoder` into the first-stage checkpoint directory unless it is there."""
    from latentdiff.training.autoencoder_loop import train_autoencoder

    path = config.model.first_stage_config.checkpoint
    if not path:
        raise ValueError("config.autoencoder needs model.first_stage_config.checkpoint: the directory "
                         "to train the first stage in")
    exported = os.path.join(path, "autoencoder", "config.json")
    wanted = config.autoencoder.model.to_dict()
    if os.path.exists(exported):
        with open(exported, encoding="utf-8") as f:
            found = json.load(f)
        for key in ("embed_dim", "n_embed", "ddconfig"):
            if _plain(found.get(key)) != _plain(wanted[key]):
                raise ValueError(f"{path} holds an autoencoder whose {key} is {found.get(key)}, but this config's "
                                 f"is {wanted[key]}: use another model.first_stage_config.checkpoint")
        return
    print(f"training the first stage in {path} (config.autoencoder), then the LDM")
    train_autoencoder(config.autoencoder, path)


def _plain(x):
    """JSON-comparable form (tuples -> lists)."""
    return json.loads(json.dumps(x))
