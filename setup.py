"""Installs the ttt namespace: ttt (TTT math and layer), ttt.models, ttt.train, ttt.configs."""

from setuptools import setup

setup(
    name="ttt",
    version="0.1.0",
    description="JAX-native test-time-training language models",
    python_requires=">=3.11",
    packages=["ttt", "ttt.models", "ttt.train", "ttt.configs"],
    package_dir={
        "ttt": "ttt",
        "ttt.models": "models",
        "ttt.train": "train",
        "ttt.configs": "configs",
    },
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax",
        "orbax-checkpoint",
        "chex",
        "tensorflow-datasets",
        "grain",
        "numpy",
        "tqdm",
        "tyro",
        "matplotlib",
        "tokenizers",
        "sentencepiece",
    ],
    entry_points={
        "console_scripts": [
            "ttt-info=ttt.models.info:main",
            "ttt-train=ttt.train.cli:train_main",
            "ttt-eval=ttt.train.cli:eval_main",
            "ttt-generate=ttt.train.cli:generate_main",
            "ttt-convert=ttt.train.convert:main",
            "ttt-read=ttt.train.memory_cli:read_main",
        ],
    },
    extras_require={
        "test": ["pytest", "nbclient", "nbformat", "ipykernel"],
    },
)
