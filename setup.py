"""latentdiff: latent diffusion models (Rombach et al., 2022) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="latentdiff",
    version="0.1.0",
    description="Latent diffusion models in JAX/Flax: autoencoders, UNet, samplers, training.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["latentdiff", "latentdiff.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "einops",
        "numpy",
        "pillow",
        "ml_collections",
        "safetensors",
        "pyyaml",
        "tqdm",
        "absl-py",
    ],
    extras_require={
        "cuda": ["jax[cuda12]"],
        "torch": ["torch"],
        "tfds": ["tensorflow-datasets"],  # reading prepared datasets; preparing some needs tensorflow-cpu
        "grain": ["grain"],  # ArrayRecord data
        "tensorboard": ["tensorboardX"],
        "test": ["pytest", "pytest-xdist", "torch", "diffusers", "transformers", "grain"],
    },
)
