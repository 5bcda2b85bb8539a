"""srno-jax: the Super-Resolution Neural Operator (Wei & Zhang, CVPR 2023) in JAX/Flax."""

from setuptools import find_packages, setup

# Training's data and logging; the core install alone upscales (CLI and notebook).
TRAIN = ["tensorflow-datasets>=4.9", "tensorboardX>=2.6", "scikit-image>=0.22"]

setup(
    name="srno-jax",
    version="0.1.0",
    description="SRNO, the Super-Resolution Neural Operator, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # flax 0.12 and orbax-checkpoint 0.12 need 3.11; on 3.10 pip would pick an older stack.
    python_requires=">=3.11",
    packages=find_packages(
        include=["srno_jax", "srno_jax.*", "input_pipeline", "input_pipeline.*", "configs"]
    ),
    # The floors are the versions tested (jax.shard_map with check_vma, explicit mesh axis
    # types, Orbax's Composite checkpoints); older ones are not known to work.
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12",
        "etils[epath]",
        "numpy>=1.26",
        "ml_collections>=0.1.1",
        "pillow>=10",
        "absl-py",
        "tqdm>=4.60",
    ],
    extras_require={
        "train": TRAIN,
        "test": [
            *TRAIN,
            "pytest>=8",
            "pytest-xdist>=3",
            "hypothesis>=6",
            "nbformat>=5",
            "nbclient>=0.10",
            "ipykernel",
            "ruff==0.17.6",  # pinned: .ci/run checks the format, which versions change
        ],
        # examples/plot_curves.py draws the training curve with it.
        "examples": [*TRAIN, "matplotlib>=3.8"],
        "gpu": ["jax[cuda12]"],
        # gs:// workdirs, checkpoints and image folders: etils.epath reads buckets with it.
        "gcs": ["gcsfs"],
    },
    entry_points={
        "console_scripts": [
            "srno-train=srno_jax.train_cli:main",
            "srno-eval=srno_jax.eval_cli:main",
            "srno-upscale=srno_jax.upscale_cli:main",
        ]
    },
)
