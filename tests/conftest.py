from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$HISTOFLOW_SHARED_DATA`` or ``../shared/data`` beside the repository."""
    env = os.environ.get("HISTOFLOW_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def require_shared(*parts: str) -> Path:
    """Path under the shared data folder; fails under CI=true and skips elsewhere when it is missing."""
    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        msg = f"shared data not found: {path} (set HISTOFLOW_SHARED_DATA)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    return require_shared("her2st")


@pytest.fixture(scope="session")
def hest_layout_dir() -> Path:
    return require_shared("her2st", "hest_layout")


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    # one OpenMP team per core: with `pytest -n 2` on 2 cores, two threads per worker oversubscribe the machine and
    # OpenMP's spinning barriers then make every step tens of times slower
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))
