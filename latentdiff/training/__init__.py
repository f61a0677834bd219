"""Training: state, pure train steps, the loops."""


def train_and_evaluate(config, workdir):
    """Run the stage `config.stage` ('ldm' or 'autoencoder') in `workdir`."""
    if config.stage == "ldm":
        from latentdiff.training.loop import train_ldm

        return train_ldm(config, workdir)
    if config.stage == "autoencoder":
        from latentdiff.training.autoencoder_loop import train_autoencoder

        return train_autoencoder(config, workdir)
    raise ValueError(f"unknown config.stage '{config.stage}': 'ldm' or 'autoencoder'")
