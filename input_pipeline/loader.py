"""Deterministic, per-host, prefetching training batches.

Sample k (0 <= k < global_batch) of step `step` has the global index
g = step * global_batch + k. Its image is ``perm[g % epoch_size] % len(source)`` with
epoch_size = len(source) * repeat and ``perm = default_rng([seed, g // epoch_size])
.permutation(epoch_size)``; its randomness is ``default_rng([seed, step, k])``. So a batch
is a function of (seed, step) alone: resuming, re-sharding over hosts or changing the
number of threads gives the same samples.
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import math
import multiprocessing
import os

import numpy as np

from input_pipeline.sampler import check_config, sample_patch
from srno_jax.errors import ConfigError


def steps_per_epoch(num_images: int, repeat: int, global_batch: int) -> int:
    """ceil(num_images * repeat / global_batch), as the reference's DataLoader
    (drop_last=False): DIV2K 800 * 20 / 64 -> 250."""
    return math.ceil(num_images * repeat / global_batch)


def _build_sample(source, i: int, seed: int, step: int, k: int, kw: dict) -> dict:
    return sample_patch(source[i], np.random.default_rng([seed, step, k]),
                        name=f"{source.name}[{i}]", **kw)


_worker_source = None  # a worker process's copy of the source, set once at its start


def _init_worker(source):
    global _worker_source
    _worker_source = source


def _build_sample_in_worker(*args) -> dict:
    return _build_sample(_worker_source, *args)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, epoch_size: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(epoch_size)


class TrainLoader:
    """An endless iterator over this host's share of each global batch.

    Each batch is a dict of float32 numpy arrays with a leading axis of
    local = global_batch // process_count (samples k in [process_index * local,
    (process_index + 1) * local)): ``inp`` (local, inp_size, inp_size, 3), ``coord``
    (local, sample_q, 2), ``cell`` (local, 2), ``gt`` (local, sample_q, 3); see
    `sample_patch`. ``step`` is the step of the next batch (save it to resume).

    `workers` threads (None: os.cpu_count()) build samples; from construction on and
    after each batch handed out, the next `prefetch` batches are in flight. Call
    `close()` or use ``with`` to stop them. With `processes`, the workers are processes
    instead (spawned; the source must pickle): part of a sample's work holds Python's
    GIL, so threads stop scaling at a few cores, processes do not. The samples are the
    same either way.
    """

    def __init__(self, source, *, global_batch: int, seed: int, start_step: int = 0,
                 process_index: int = 0, process_count: int = 1, inp_size: int = 128,
                 scale_min: float = 1.0, scale_max: float = 4.0, augment: bool = True,
                 sample_q: int | None = None, repeat: int = 1, workers: int | None = None,
                 prefetch: int = 2, processes: bool = False):
        if global_batch < 1 or global_batch % process_count:
            raise ConfigError(f"global_batch {global_batch} must be a positive multiple of "
                              f"process_count {process_count}")
        if not 0 <= process_index < process_count:
            raise ConfigError(f"process_index {process_index} not in [0, {process_count})")
        if seed < 0 or start_step < 0 or repeat < 1 or prefetch < 0:
            raise ConfigError(f"need seed >= 0, start_step >= 0, repeat >= 1, prefetch >= 0; "
                              f"got {seed}, {start_step}, {repeat}, {prefetch}")
        workers = workers or os.cpu_count() or 1
        self.source = source
        self.global_batch = global_batch
        self.seed = seed
        self.step = start_step
        self.local = global_batch // process_count
        self.first_k = process_index * self.local
        self.epoch_size = len(source) * repeat
        self.prefetch = prefetch
        self._sample_kw = dict(inp_size=inp_size, scale_min=scale_min, scale_max=scale_max,
                               augment=augment,
                               sample_q=check_config(inp_size, scale_min, scale_max, sample_q))
        self._processes = processes
        if processes:  # the source is sent to each process once, at its start
            self._pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(source,))
        else:
            self._pool = concurrent.futures.ThreadPoolExecutor(workers, "train-loader")
        self._pending = collections.deque()  # (step, [future per local sample])
        self._next_submit = start_step
        self._closed = False
        self._fill(prefetch)

    def image_index(self, step: int, k: int) -> int:
        """The source index of sample k of `step` (see the module docstring)."""
        g = step * self.global_batch + k
        perm = _epoch_permutation(self.seed, g // self.epoch_size, self.epoch_size)
        return int(perm[g % self.epoch_size]) % len(self.source)

    def _submit(self, step: int, k: int):
        args = (self.image_index(step, k), self.seed, step, k, self._sample_kw)
        if self._processes:
            return self._pool.submit(_build_sample_in_worker, *args)
        return self._pool.submit(_build_sample, self.source, *args)

    def _fill(self, n: int):
        """Submits batches until `n` are in flight."""
        while len(self._pending) < n:
            s = self._next_submit
            ks = range(self.first_k, self.first_k + self.local)
            self._pending.append((s, [self._submit(s, k) for k in ks]))
            self._next_submit += 1

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise RuntimeError("TrainLoader is closed")
        self._fill(1)
        step, futures = self._pending.popleft()
        self._fill(self.prefetch)
        samples = [f.result() for f in futures]
        self.step = step + 1
        return {key: np.stack([s[key] for s in samples]) for key in samples[0]}

    def close(self):
        """Stops the threads; batches in flight are dropped."""
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
