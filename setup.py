"""llm_research: a JAX/Flax research codebase for LLMs on TPU and GPU."""
from setuptools import find_packages, setup

setup(
    name="llm_research",
    version="0.1.0",
    description="JAX/Flax research codebase for LLMs: transformer, sharding, Pallas kernels.",
    python_requires=">=3.11",
    # kernels/ installs as llm_research.kernels: PyPI's `kernels` owns the bare name.
    packages=find_packages(include=["llm_research", "llm_research.*"]) + ["llm_research.kernels"],
    package_dir={"llm_research.kernels": "kernels"},
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "chex",
        "tensorflow-datasets",
        "grain",
        "sentencepiece",
        "ml_collections",
        "tensorboardX",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel"],
    },
)
