"""latentdiff: the paper's latent diffusion models in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import latentdiff` stays cheap and free of side effects.
    if name == "LatentDiffusionPipeline":
        from latentdiff.pipeline import LatentDiffusionPipeline

        return LatentDiffusionPipeline
    if name == "forward_mode":
        from latentdiff.models.layers import forward_mode

        return forward_mode
    raise AttributeError(name)
