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
        # Floors: the versions the test suite passed with (CPU, Python 3.11); older ones are
        # untested (jax.set_mesh alone needs jax 0.7.1 or later).
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "chex>=0.1.92",
        "numpy>=2.4.6",
        "etils[epath]>=1.15.0",
        "tensorflow-datasets>=4.9.10",
        "grain>=0.2.18",
        "sentencepiece>=0.2.3",
        "ml_collections>=1.1.0",
        "tensorboardX>=2.6.5",
        "tqdm>=4.70.1",
        "matplotlib>=3.11.2",  # the notebooks' and experiments' figures
        "music21>=10.5.1",  # bGPT's ABC tunes and their MIDI files (data/abc_midi.py)
        "scikit-learn>=1.9.1",  # bGPT's digit images (data/media.py)
        "safetensors>=0.8.0",  # Hugging Face checkpoints, read with numpy (convert.py)
        "tokenizers>=0.23.3",  # Hugging Face tokenizer.json files (data/tokenizers.py)
    ],
    extras_require={
        "test": ["pytest>=9.2.0", "pytest-xdist>=3.8.0", "nbclient>=0.11.0", "nbformat>=5.11.1",
                 "ipykernel>=7.4.0", "portpicker>=1.6.0",
                 # tests/test_convert.py compares with transformers; torch pinned to its CPU
                 # build's version (any other pulls a multi-GB CUDA build).
                 "transformers>=5.25.0", "torch==2.13.0"],
        # JAX's own extras: the CUDA 13 wheels (NVIDIA driver 580 or newer), or libtpu.
        "cuda": ["jax[cuda13]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2"],
    },
)
