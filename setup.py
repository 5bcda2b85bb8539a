"""srno-jax: the Super-Resolution Neural Operator (Wei & Zhang, CVPR 2023) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="srno-jax",
    version="0.1.0",
    description="SRNO, the Super-Resolution Neural Operator, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["srno_jax", "srno_jax.*", "input_pipeline", "input_pipeline.*", "configs"]),
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "numpy>=1.26",
        "ml_collections>=0.1.1",
        "pillow>=10",
        "absl-py",
        "tensorboardX>=2.6",
        "scikit-image>=0.22",
        "tensorflow-datasets>=4.9",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "nbformat>=5", "nbclient>=0.10", "ipykernel"],
    },
    entry_points={"console_scripts": ["srno-upscale=srno_jax.upscale_cli:main"]},
)
