"""Deterministic, per-host, prefetching training batches.

Sample k (0 <= k < global_batch) of step `step` has the global index
g = step * global_batch + k. Its image is ``perm[g % epoch_size] % len(source)`` with
epoch_size = len(source) * repeat and ``perm = default_rng([seed, g // epoch_size])
.permutation(epoch_size)``; its randomness is ``default_rng([seed, step, k])``. So a batch
is a function of (seed, step) alone: resuming, re-sharding over hosts or changing the
number of workers gives the same samples.
"""

from __future__ import annotations

import collections
import concurrent.futures
import fcntl
import functools
import hashlib
import json
import logging
import math
import mmap
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
import weakref

import numpy as np

from input_pipeline.sampler import check_sampler_settings, sample_pair_patch, sample_patch
from input_pipeline.sources import PairedSource
from srno_jax.errors import ConfigError, HostError

log = logging.getLogger("srno_jax.data")

_ALIGN = 64  # bytes: each array of a batch block starts on a cache line
_SHM_PREFIX = "srno-loader-"  # one loader's batches
_DECODED_PREFIX = "srno-decoded-"  # decoded images, shared by the loaders of one source


def steps_per_epoch(num_images: int, repeat: int, global_batch: int) -> int:
    """ceil(num_images * repeat / global_batch), as the reference's DataLoader
    (drop_last=False): DIV2K 800 * 20 / 64 -> 250."""
    return math.ceil(num_images * repeat / global_batch)


def _batch_layout(local: int, inp_size: int, sample_q: int) -> tuple[dict, int]:
    """Where each float32 array of a local batch lies in one block of memory.

    Returns ({key: (shape, byte offset)} for ``inp``, ``coord``, ``cell``, ``gt`` in that
    order, each offset a multiple of 64; the block's size in bytes).
    """
    shapes = {
        "inp": (local, inp_size, inp_size, 3),
        "coord": (local, sample_q, 2),
        "cell": (local, 2),
        "gt": (local, sample_q, 3),
    }
    layout, offset = {}, 0
    for key, shape in shapes.items():
        layout[key] = (shape, offset)
        offset += -(-4 * math.prod(shape) // _ALIGN) * _ALIGN
    return layout, offset


def _views(flat: np.ndarray, layout: dict) -> dict:
    """The batch's float32 arrays as views of `flat`, a uint8 array over a whole block.

    Every view's ``base`` is `flat`, so `flat` lives exactly as long as some array of the
    batch (or anything made from one) does.
    """
    return {
        k: flat[off : off + 4 * math.prod(shape)].view(np.float32).reshape(shape)
        for k, (shape, off) in layout.items()
    }


def _build_sample(source, i: int, seed: int, step: int, k: int, kw: dict) -> dict:
    rng = np.random.default_rng([seed, step, k])
    inner = getattr(source, "source", source)  # under _DecodedOnce too
    if isinstance(inner, PairedSource):
        return sample_pair_patch(*source[i], rng, **kw)
    files = getattr(inner, "files", None)
    name = files[i] if files is not None else f"{source.name}[{i}]"
    return sample_patch(source[i], rng, name=name, **kw)


def _build_rows(source, buf, layout: dict, todo: list, seed: int, step: int, kw: dict) -> None:
    """Writes sample k of `step` (image i) into row `row` of each array of the batch in
    `buf`, for each (row, k, i) in `todo`."""
    out = _views(np.frombuffer(buf, np.uint8), layout)
    for row, k, i in todo:
        sample = _build_sample(source, i, seed, step, k, kw)
        for key, a in out.items():
            a[row] = sample[key]


_worker_source = None  # a worker process's copy of the source, set once at its start
_worker_started = None  # a barrier for all worker processes of the pool
_worker_blocks: dict = {}  # path -> this worker's lasting mapping of that block


def _init_worker(source, started, decoded_dir):
    global _worker_source, _worker_started
    # A scheduler's stop (SLURM's time limit, Ctrl-C) goes to the whole process group. The
    # main process stops the run at an agreed step and then closes the pool; a worker that
    # died of the signal first would break the pool, and the run would fail unsaved.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Nor does a worker outlive the main process when that is killed outright (kill -9, an
    # out-of-memory kill): nothing would read its batches, and it would hold its memory.
    parent = os.getppid()

    def exit_with_parent():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_with_parent, name="parent-watch", daemon=True).start()
    _worker_source = _DecodedOnce(source, decoded_dir) if decoded_dir else source
    _worker_started = started


class _DecodedOnce:
    """A source (a folder, TFDS, paired folders) whose items all worker processes decode
    once.

    The first worker to read item i saves its arrays decoded (an image, or a pair's LR and
    HR and its scale) as ``<folder>/image-<i>-<k>.npy``, each written beside and then
    renamed, and then ``image-<i>.parts`` with their count, so an item is complete or
    absent. Every later read, in any worker, maps those files read-only, so the pages are
    shared, not copied. An item is saved only while its file system keeps half its size
    free; past that it is decoded at each read, as without this cache.
    """

    def __init__(self, source, folder: str):
        self.source, self.folder, self.name = source, folder, source.name
        self._mapped = {}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        i = int(i)
        if i not in self._mapped:
            base = os.path.join(self.folder, f"image-{i}")
            if not os.path.exists(f"{base}.parts"):
                item = self.source[i]
                parts = item if isinstance(item, tuple) else (item,)
                st = os.statvfs(self.folder)
                room = (st.f_bavail - st.f_blocks // 2) * st.f_frsize
                if room < sum(np.asarray(p).nbytes for p in parts):
                    self._warn_full()
                    return item
                for k, part in enumerate(parts):
                    _write_atomically(f"{base}-{k}.npy", lambda f, part=part: np.save(f, part))
                _write_atomically(f"{base}.parts", lambda f: f.write(b"%d" % len(parts)))
            with open(f"{base}.parts", "rb") as f:
                n = int(f.read())
            # A pair's scale comes back as the float it was, not as a 0-d array.
            loaded = [np.load(f"{base}-{k}.npy", mmap_mode="r") for k in range(n)]
            loaded = [x.item() if x.ndim == 0 else x for x in loaded]
            self._mapped[i] = tuple(loaded) if n > 1 else loaded[0]
        return self._mapped[i]

    def _warn_full(self) -> None:
        """Says once per run, from the first worker to find it, that the cache is full: a
        run that decodes at each read can be many times slower."""
        try:
            os.close(os.open(os.path.join(self.folder, "full"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        log.warning(
            "%s is half full: the images not decoded there yet are decoded at every read "
            "from now on, which can make the loader many times slower; give the machine or "
            "container more shared memory (docker run --shm-size=...)",
            os.path.dirname(self.folder),
        )


def _write_atomically(path: str, write) -> None:
    """`write(file)` into a new file beside `path`, then renamed to `path`. The name is
    unique across containers that share /dev/shm, where process ids are not."""
    fd, part = tempfile.mkstemp(prefix=os.path.basename(path) + ".", dir=os.path.dirname(path))
    with os.fdopen(fd, "wb") as f:
        write(f)
    os.replace(part, path)


def _wait_for_all_workers() -> None:
    _worker_started.wait()


def _build_rows_in_worker(path: str, *args) -> None:
    """`_build_rows` into the shared block at `path`, mapped once per worker: a block's
    pages are reused batch after batch, so mapping them costs nothing after the first."""
    if path not in _worker_blocks:
        with open(path, "r+b") as f:
            _worker_blocks[path] = mmap.mmap(f.fileno(), 0)
    _build_rows(_worker_source, _worker_blocks[path], *args)


class _Block:
    """One batch's memory: anonymous for threads, a file in `folder` for processes."""

    def __init__(self, nbytes: int, folder: str | None, index: int):
        self.path, self.busy, self.handed_out = None, False, None
        if folder is None:
            self.buf = mmap.mmap(-1, nbytes)
            return
        self.path = os.path.join(folder, str(index))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if hasattr(os, "posix_fallocate"):  # reserve now: a full /dev/shm is an
                os.posix_fallocate(fd, 0, nbytes)  # error here, not a SIGBUS in a worker
            else:
                os.ftruncate(fd, nbytes)
            self.buf = mmap.mmap(fd, nbytes)
        except OSError as e:
            os.unlink(self.path)
            raise ConfigError(
                f"no room for the loader's batches in {folder} ({nbytes >> 20} MB each: "
                f"{e.strerror}); give the machine or container more shared memory (docker "
                f"run --shm-size=2g), lower data.prefetch, or use worker threads "
                f"(data.worker_processes=False)"
            ) from None
        finally:
            os.close(fd)

    def free(self) -> bool:
        """Not being written, and no array of the batch last handed out from it alive."""
        return not self.busy and (self.handed_out is None or self.handed_out() is None)


def _shm_base() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _shared_memory_dir() -> tuple[str, int]:
    """A new private folder in /dev/shm (the temp folder where there is none), and an
    open descriptor holding the lock of its ``lock`` file, which marks it as in use.

    Folders of loaders (this one and `_decoded_cache_dir`'s) whose lock is free were
    left by loaders that no longer run (killed before their cleanup) and are removed
    first. The kernel drops a dead process's lock, even one in another container sharing
    /dev/shm, which a process id could not tell.
    """
    base = _shm_base()
    for entry in os.listdir(base):
        if entry.startswith((_SHM_PREFIX, _DECODED_PREFIX)):
            _remove_if_unused(os.path.join(base, entry))
    folder = tempfile.mkdtemp(prefix=_SHM_PREFIX, dir=base)
    # Locked before it takes its name: no one can see it unlocked.
    fd = os.open(os.path.join(folder, "lock.new"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(os.path.join(folder, "lock.new"), os.path.join(folder, "lock"))
    return folder, fd


def _decoded_cache_dir(source) -> tuple[str, int]:
    """The folder in which worker processes decode each item of `source` once
    (`_DecodedOnce`), and a descriptor holding a shared lock on its ``lock`` file.

    Every loader of the same content (``source.content_key()``) on this machine, by this
    user, uses one folder: the eight tasks of a SLURM node hold one decoded copy of
    DIV2K, not eight. The last loader to leave removes it (`_remove_if_alone`).
    """
    text = json.dumps([type(source).__name__, source.content_key()])
    key = hashlib.sha256(text.encode()).hexdigest()[:24]
    folder = os.path.join(_shm_base(), f"{_DECODED_PREFIX}{os.getuid()}-{key}")
    lock = os.path.join(folder, "lock")
    while True:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:  # removed in between
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return folder, fd
        except FileNotFoundError:
            pass
        os.close(fd)  # removed while this waited for its lock: made anew


def _remove_if_alone(folder: str, fd: int) -> None:
    """Removes `folder` if `fd`, open on its lock, can take the lock alone (no loader
    uses the folder, or none but this one); closes `fd` either way."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another loader uses it
        os.close(fd)
        return
    _remove_locked(folder, fd)


def _remove_if_unused(folder: str) -> None:
    try:
        fd = os.open(os.path.join(folder, "lock"), os.O_RDONLY)
    except OSError:  # being made, removed by another loader, or another user's
        return
    _remove_if_alone(folder, fd)


def _remove_locked(folder: str, fd: int) -> None:
    """Removes `folder`, whose lock `fd` holds alone, and closes `fd`. It is renamed
    first: a loader waiting to join it (`_decoded_cache_dir`) then finds it gone.

    Nothing is removed when `fd`'s file is no longer the folder's lock: the folder was
    removed while this waited, and the one of that name now is another loader's."""
    try:
        current = os.stat(os.path.join(folder, "lock")).st_ino
    except FileNotFoundError:
        current = None
    if current != os.fstat(fd).st_ino:
        os.close(fd)
        return
    doomed = f"{folder}.removed-{os.urandom(4).hex()}"
    try:
        os.rename(folder, doomed)
    except OSError:
        doomed = folder
    shutil.rmtree(doomed, ignore_errors=True)
    os.close(fd)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, epoch_size: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(epoch_size)


class TrainLoader:
    """An endless iterator over this host's share of each global batch.

    Each batch is a dict of float32 numpy arrays with a leading axis of
    local = global_batch // process_count (samples k in [process_index * local,
    (process_index + 1) * local)): ``inp`` (local, inp_size, inp_size, 3), ``coord``
    (local, sample_q, 2), ``cell`` (local, 2), ``gt`` (local, sample_q, 3); see
    `sample_patch`. ``step`` is the step of the next batch (save it to resume). Each
    batch's arrays are its own: nothing the loader does later writes to them.

    A `PairedSource` gives `sample_pair_patch` samples (each pair at its own scale;
    scale_min and scale_max unused), any other source `sample_patch` samples. The settings
    are checked once, here (`check_sampler_settings`; for pairs also that every LR image
    holds an inp_size patch).

    `workers` threads (None: os.cpu_count()) build samples, each a contiguous chunk of
    about local / workers samples of a batch, written in place into one block of memory
    that the batch's arrays view; from construction on and after each batch handed out,
    the next `prefetch` batches are in flight. A block is reused once no array of the
    batch it last held is referenced any more, so its pages are allocated once, and
    nothing the loader does later writes to a batch that is still in use. Call `close()`
    or use ``with`` to stop the workers. With `processes`, the workers are processes
    instead (spawned; the source must pickle) and the blocks are files in /dev/shm that
    every worker maps once: nothing is pickled, stacked or copied per sample; a source
    that decodes at each read (a folder, TFDS, pairs) is decoded once per item for all
    workers, and for every loader of the same images on the machine (`_DecodedOnce`,
    `_decoded_cache_dir`); and worker processes that have not all started, or not
    finished a batch, within `stall_timeout_s` (a stalled network file system, a hung
    decoder) are a `HostError`, not a wait until the job's time limit. A batch that fails
    raises its error, and every later call then raises too: its step cannot be skipped.
    Part of a sample's work holds Python's GIL, so threads stop scaling at a few cores,
    processes do not. The samples are the same either way.
    """

    def __init__(
        self,
        source,
        *,
        global_batch: int,
        seed: int,
        start_step: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        inp_size: int = 128,
        scale_min: float = 1.0,
        scale_max: float = 4.0,
        augment: bool = True,
        sample_q: int | None = None,
        repeat: int = 1,
        workers: int | None = None,
        prefetch: int = 2,
        processes: bool = False,
        stall_timeout_s: float = 600.0,
    ):
        if global_batch < 1 or global_batch % process_count:
            raise ConfigError(
                f"global_batch {global_batch} must be a positive multiple of "
                f"process_count {process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ConfigError(f"process_index {process_index} not in [0, {process_count})")
        if seed < 0 or start_step < 0 or repeat < 1 or prefetch < 0:
            raise ConfigError(
                f"need seed >= 0, start_step >= 0, repeat >= 1, prefetch >= 0; "
                f"got {seed}, {start_step}, {repeat}, {prefetch}"
            )
        sample_q = check_sampler_settings(inp_size, scale_min, scale_max, sample_q)
        self._sample_kw = dict(inp_size=inp_size, augment=augment, sample_q=sample_q)
        if isinstance(source, PairedSource):
            source.check_inp_size(inp_size)
        else:
            self._sample_kw.update(scale_min=scale_min, scale_max=scale_max)
        workers = workers or os.cpu_count() or 1
        self.source = source
        self.stall_timeout_s = stall_timeout_s
        self.global_batch = global_batch
        self.seed = seed
        self.step = start_step
        self.local = global_batch // process_count
        self.first_k = process_index * self.local
        self.epoch_size = len(source) * repeat
        self.prefetch = prefetch
        self._chunk = -(-self.local // workers)
        self._layout, self._nbytes = _batch_layout(self.local, inp_size, sample_q)
        self._blocks: list[_Block] = []
        self._pending = collections.deque()  # (step, block, [future per chunk])
        self._next_submit = start_step
        self._closed = False
        self._failed = None  # the step whose batch failed
        self._shm_dir = self._decoded_dir = None
        self._release = []  # the shared memory folders' removal, after the workers stop
        if processes:  # the source is sent to each process once, at its start
            self._shm_dir, lock_fd = _shared_memory_dir()
            self._release.append(weakref.finalize(self, _remove_locked, self._shm_dir, lock_fd))
            if getattr(source, "decodes_each_read", False):
                self._decoded_dir, lock_fd = _decoded_cache_dir(source)
                self._release.append(
                    weakref.finalize(self, _remove_if_alone, self._decoded_dir, lock_fd)
                )
            context = multiprocessing.get_context("spawn")
            self._pool = concurrent.futures.ProcessPoolExecutor(
                workers,
                mp_context=context,
                initializer=_init_worker,
                initargs=(source, context.Barrier(workers), self._decoded_dir),
            )
        else:
            self._pool = concurrent.futures.ThreadPoolExecutor(workers, "train-loader")
        try:
            if processes:
                # The pool starts a process per task while none is idle: tasks that wait
                # for each other start every worker now, not one by one during training.
                deadline = time.monotonic() + stall_timeout_s
                try:
                    for f in [self._pool.submit(_wait_for_all_workers) for _ in range(workers)]:
                        f.result(max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    raise HostError(
                        f"the data loader's {workers} worker processes did not all start "
                        f"in {stall_timeout_s:g} s: one is stuck (a stalled network file "
                        "system or bucket, a hung import); rerun to resume from the last "
                        "checkpoint"
                    ) from None
            self._fill(prefetch)
        except BaseException:
            self.close()
            raise

    def image_index(self, step: int, k: int) -> int:
        """The source index of sample k of `step` (see the module docstring)."""
        g = step * self.global_batch + k
        perm = _epoch_permutation(self.seed, g // self.epoch_size, self.epoch_size)
        return int(perm[g % self.epoch_size]) % len(self.source)

    def _take_block(self) -> _Block:
        block = next((b for b in self._blocks if b.free()), None)
        if block is None:
            block = _Block(self._nbytes, self._shm_dir, len(self._blocks))
            self._blocks.append(block)
        block.busy, block.handed_out = True, None
        return block

    def _submit(self, step: int):
        """Starts building the batch of `step`: one task per chunk of its samples."""
        block = self._take_block()
        todo = [
            (k - self.first_k, k, self.image_index(step, k))
            for k in range(self.first_k, self.first_k + self.local)
        ]
        futures = []
        for c in range(0, self.local, self._chunk):
            args = (self._layout, todo[c : c + self._chunk], self.seed, step, self._sample_kw)
            if block.path is None:
                futures.append(self._pool.submit(_build_rows, self.source, block.buf, *args))
            else:
                futures.append(self._pool.submit(_build_rows_in_worker, block.path, *args))
        self._pending.append((step, block, futures))

    def _fill(self, n: int):
        """Submits batches until `n` are in flight."""
        while len(self._pending) < n:
            self._submit(self._next_submit)
            self._next_submit += 1

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise RuntimeError("TrainLoader is closed")
        if self._failed is not None:
            raise RuntimeError(
                f"the TrainLoader failed at step {self._failed}; make a new one with "
                f"start_step={self._failed} to go on"
            )
        try:
            try:
                return self._next()
            except concurrent.futures.BrokenExecutor as e:  # from a result, or a submit
                raise HostError(
                    f"a data loader worker process died building the batch of step "
                    f"{self.step} ({e}): killed for memory (see dmesg) or crashed; rerun to "
                    "resume from the last checkpoint, with fewer --config.data.workers if "
                    "memory ran out"
                ) from None
        except BaseException:
            # The failed batch's other chunks may still write into its block, and its
            # step would be skipped: this loader hands out nothing more.
            self._failed = self.step
            raise

    def _next(self) -> dict:
        self._fill(1)
        step, block, futures = self._pending.popleft()
        self._fill(self.prefetch)
        # Worker processes can be killed when they hang (`close`); a thread cannot, so
        # threads are waited for.
        deadline = time.monotonic() + self.stall_timeout_s if self._shm_dir else None
        try:
            for f in futures:
                f.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise HostError(
                f"the data loader made no batch for step {step} in {self.stall_timeout_s:g} "
                "s: a worker process is stuck (a stalled network file system or bucket, a "
                "hung decoder); rerun to resume from the last checkpoint"
            ) from None
        block.busy = False  # only now: after an error, a chunk may still write into it
        flat = np.frombuffer(block.buf, np.uint8)
        block.handed_out = weakref.ref(flat)
        self.step = step + 1
        return _views(flat, self._layout)

    def close(self):
        """Stops the workers; batches in flight are dropped, batches handed out stay."""
        self._closed = True
        if self._shm_dir is None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        else:
            self._stop_processes()
        self._pending.clear()
        self._blocks.clear()
        for release in self._release:
            release()

    def _stop_processes(self, grace_s: float = 10.0):
        """Shuts the process pool down, killing workers that do not exit within `grace_s`.

        A worker killed outright (the out-of-memory killer) can die holding the pool's
        task-queue lock; the others then wait on it forever. The pool's own terminate()
        sends SIGTERM, which workers ignore (see `_init_worker`), so without SIGKILL here
        the shutdown, and the run, would hang until the job's time limit.
        """
        # ProcessPoolExecutor keeps these private; without them, a plain shutdown.
        procs = list((getattr(self._pool, "_processes", None) or {}).values())
        manager = getattr(self._pool, "_executor_manager_thread", None)
        self._pool.shutdown(wait=not procs, cancel_futures=True)
        deadline = time.monotonic() + grace_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        if manager is not None:
            manager.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
