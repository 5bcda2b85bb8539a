"""Training data for srno-jax: image and pair sources, the samplers, batches.

source = make_source('demo' | 'div2k' | '/path/to/DIV2K_train_HR' | '/path/to/pairs')
with TrainLoader(source, global_batch=64, seed=0, repeat=20, ...) as loader:
    batch = next(loader)   # {'inp', 'coord', 'cell', 'gt'}: this host's share
"""

from input_pipeline.loader import TrainLoader, steps_per_epoch
from input_pipeline.sampler import check_sampler_settings, sample_pair_patch, sample_patch
from input_pipeline.sources import (
    DEMO_FILES,
    DemoSource,
    FolderSource,
    PairedSource,
    TFDSSource,
    describe,
    make_source,
)

__all__ = [
    "TrainLoader",
    "steps_per_epoch",
    "check_sampler_settings",
    "sample_patch",
    "sample_pair_patch",
    "DEMO_FILES",
    "DemoSource",
    "FolderSource",
    "PairedSource",
    "TFDSSource",
    "describe",
    "make_source",
]
