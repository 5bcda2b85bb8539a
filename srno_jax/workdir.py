"""The training workdir: checks before any work, and a lock so that one run owns it.

Paths go through `etils.epath`, so a workdir can be local or a bucket (`gs://...`).
The lock is `<workdir>/LOCK`, a JSON file with the holder's host, process id, folder and
a heartbeat time that a background thread refreshes every `HEARTBEAT_S` seconds. Another
run refuses to start while the lock is live, and takes it over when its holder is gone:
on the same host when that process no longer exists or holds another folder (this one is
a copy), on another host when the heartbeat is older than `STALE_S`. A holder whose lock
was taken over (it was paused past `STALE_S`) learns it at its next heartbeat
(`WorkdirLock.lost`). In a multi-host run process 0 holds it for all.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from etils import epath

from srno_jax.errors import ConfigError

LOCK_NAME = "LOCK"
SUBFOLDERS = ("checkpoints", "tensorboard")  # what a run writes in its workdir
HEARTBEAT_S = 30.0
STALE_S = 120.0


def is_uri(path: str | os.PathLike) -> bool:
    """Whether `path` names a bucket's file or folder (``gs://bucket/run``), which only
    epath reads, rather than a local path."""
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
    """A local path made absolute with ``~`` expanded (Orbax needs absolute paths), or a
    URI such as ``gs://bucket/run`` as it is."""
    return epath.Path(path) if is_uri(path) else epath.Path(path).expanduser().absolute()


def check_writable(workdir: str | os.PathLike) -> epath.Path:
    """Creates `workdir` if needed and checks that it is a writable folder, and that the
    folders a run writes in it (`SUBFOLDERS`) are writable folders where they exist.

    Raises `ConfigError` in one line when one is a file or cannot be written.
    """
    path = resolve(workdir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--workdir {path} is a file, not a folder; give a folder path")
    for name in SUBFOLDERS:
        if (path / name).exists() and not (path / name).is_dir():
            raise ConfigError(
                f"{path / name} is a file, but a run keeps its {name} in a folder of that "
                "name; move the file away or use another --workdir"
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"--workdir {path} is not writable ({e.strerror or e}); choose a folder you can write to"
        ) from None
    # A read-only checkpoints/ would fail only at the first save, hours later.
    for folder in [path] + [path / name for name in SUBFOLDERS if (path / name).exists()]:
        probe = folder / f".write-test-{uuid.uuid4().hex}"
        try:
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(
                f"{'--workdir ' if folder == path else ''}{folder} is not writable "
                f"({e.strerror or e}); choose a workdir you can write to, or fix its permissions"
            ) from None
    return path


_HELD: set[str] = set()  # tokens of the locks this process holds


def _holder_alive(info: dict, folder: epath.Path | None = None) -> bool:
    """Whether the run that wrote lock `info` (found in `folder`) still runs: its heartbeat
    is fresh and, on this host, its process exists and holds `folder`, not the folder
    this one was copied from; with this process's pid, only if this process holds that
    lock (a restarted container reuses pids, and may give this run the old one)."""
    if info.get("host") == socket.gethostname():
        held = info.get("workdir")
        if folder is not None and held and not _same_folder(held, folder):
            return False
        try:
            if int(info["pid"]) == os.getpid():
                return info.get("token") in _HELD
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, KeyError):
            pass  # another user's process, or no pid: the heartbeat decides
    return time.time() - float(info.get("heartbeat", 0)) < STALE_S


def _same_folder(a, b) -> bool:
    if is_uri(a) or is_uri(b):
        return os.fspath(a) == os.fspath(b)
    return os.path.realpath(os.fspath(a)) == os.path.realpath(os.fspath(b))


def _read(lock: epath.Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written by its holder, or garbage: judged by its age below


def lock_token(workdir: str | os.PathLike, wait_s: float = 60.0) -> str | None:
    """The token of the run that holds `workdir`'s lock, or None when there is none (or
    its file stays unreadable) for `wait_s` seconds: a network file system may show a new
    file to other hosts only after its attribute cache expires (NFS: up to a minute)."""
    deadline = time.time() + wait_s
    while True:
        info = _read(resolve(workdir) / LOCK_NAME)  # {}: caught half-written, or garbage
        if info or time.time() > deadline:
            return (info or {}).get("token")
        time.sleep(1.0)


class WorkdirLock:
    """Holds `<workdir>/LOCK` while the run is on (a context manager); see the module."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = resolve(workdir) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.lost: ConfigError | None = None  # set when another run took the lock over
        self._stop = threading.Event()
        self._thread = None

    def _info(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "workdir": os.fspath(self.path.parent),
            "token": self.token,
            "heartbeat": time.time(),
        }

    def acquire(self) -> None:
        """Takes the lock or raises `ConfigError` naming the run that holds it."""
        info = _read(self.path)
        if info is not None:
            age = time.time() - self.path.stat().mtime if not info else 0.0
            if (info and _holder_alive(info, self.path.parent)) or (not info and age < STALE_S):
                who = (
                    f"process {info.get('pid')} on host {info.get('host')}"
                    if info
                    else "another run"
                )
                raise ConfigError(
                    f"workdir {self.path.parent} is in use by {who} (lock file {self.path}); "
                    "wait for it to finish, use another --workdir, or delete the lock file "
                    f"if that run is gone (it is taken over {STALE_S:.0f} s after its last "
                    "heartbeat)"
                )
            self._take_over(info)
        self._create()
        _HELD.add(self.token)
        self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True)
        self._thread.start()

    def _take_over(self, stale: dict) -> None:
        """Removes the lock `stale` of a run that is gone. Locally it is first renamed to
        a name of this run's own, which one run alone can do; if what was renamed is not
        `stale` (another run took it over since it was read), it is put back."""
        if is_uri(self.path):  # a bucket: `_create` reads back who won
            self.path.unlink(missing_ok=True)
            return
        aside = self.path.with_name(f"{LOCK_NAME}.{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # taken away by another run: `_create` decides between us
        taken = _read(aside)
        if taken != stale:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink()
            raise self._just_locked()
        aside.unlink()

    def _just_locked(self) -> ConfigError:
        return ConfigError(
            f"workdir {self.path.parent} was just locked by another run started at the "
            "same time; use another --workdir"
        )

    def _create(self) -> None:
        data = json.dumps(self._info())
        if not is_uri(self.path):
            try:  # local: atomic, so two runs started together cannot both win
                fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                raise self._just_locked() from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(data)
            except OSError:  # an empty lock would look like another run's, half-written
                self.path.unlink(missing_ok=True)
                raise
            return
        # Buckets have no exclusive create: write, then read back who won.
        self.path.write_text(data)
        time.sleep(1.0)
        if (_read(self.path) or {}).get("token") != self.token:
            raise self._just_locked()

    def _write(self) -> None:
        """Refreshes the heartbeat. Locally the file is replaced whole: a write cut short
        (a full disk) must not leave a lock that reads as nobody's."""
        data = json.dumps(self._info())
        if is_uri(self.path):  # an object is replaced whole anyway
            self.path.write_text(data)
            return
        new = self.path.with_name(f"{LOCK_NAME}.{self.token}.new")
        try:
            new.write_text(data)
            os.replace(new, self.path)
        finally:
            new.unlink(missing_ok=True)

    def check(self) -> bool:
        """Whether this run still holds the lock: reads the file, and sets `lost` when it
        names another run. A file that is missing or unreadable for now proves nothing."""
        if self.lost is None:
            info = _read(self.path)
            if info and info.get("token") != self.token:
                self.lost = ConfigError(
                    f"workdir {self.path.parent} was taken over by process {info.get('pid')} "
                    f"on host {info.get('host')} (this run was paused, or its heartbeat "
                    f"stalled, for over {STALE_S:.0f} s); this run stops without saving "
                    "again, so that two runs never write one workdir"
                )
        return self.lost is None

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self.path.exists():  # deleted or moved by hand: ours again,
                    self._create()  # unless another run was quicker
                elif self.check():
                    self._write()
            except ConfigError:  # another run created it first
                self.check()
            except OSError:  # a full disk, a folder moved: the next beat tries again
                pass
            if self.lost is not None:
                return

    def release(self) -> None:
        _HELD.discard(self.token)
        self._stop.set()
        if self._thread:
            self._thread.join()
        if (_read(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
