"""Shared fixtures: where the golden vectors live, and the small golden model."""

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# CI lays shared/ beside the project; a copy of the small set ships in tests/golden.
GOLDEN_DIRS = [ROOT.parent / "shared" / "golden", ROOT / "tests" / "golden"]


def golden_dir(name: str) -> Path | None:
    for d in GOLDEN_DIRS:
        if (d / name / "cases.npz").exists():
            return d / name
    return None


# The set that ships with the tests: its absence is a broken checkout, not a reason to skip.
SHIPPED = "small_edsr_srno"
SMALL_GOLDEN = golden_dir(SHIPPED)


def pytest_sessionstart(session):
    if SMALL_GOLDEN is None:
        raise pytest.UsageError(f"tests/golden/{SHIPPED}/cases.npz is missing: restore it from git")


def require_golden(name: str) -> Path:
    """The folder of golden set `name`; the larger sets live only in ../shared, so a
    checkout without it skips their tests."""
    d = golden_dir(name)
    if d is None:
        pytest.skip(f"golden set {name} not found in {[str(g) for g in GOLDEN_DIRS]}")
    return d


@pytest.fixture(scope="session")
def small_golden():
    """(model, variables, cases) of the small golden EDSR-SRNO."""
    from srno_jax import load_checkpoint

    d = require_golden("small_edsr_srno")
    model, variables = load_checkpoint(d / "checkpoint.pth")
    return model, variables, dict(np.load(d / "cases.npz"))


@pytest.fixture
def sigterm_guard():
    """For a test that sends itself SIGTERM: a handler that fails the test instead of the
    default, which would end pytest. Yields it; the previous handler is put back after."""
    import signal

    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the handler the command should have replaced")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield unhandled
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def fake_gcs(monkeypatch):
    """gs:// (and gcs://) served by an in-memory fsspec file system, for this test only."""
    import sys

    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath passes it
            super().__init__(*args, **kwargs)

    for name in ("gs", "gcs"):
        monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, name, FakeGCS)
