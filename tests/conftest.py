"""Shared fixtures. Real data comes from QKV_DATA_DIR (the Makefile points it at
../shared/data); a test that needs it skips when it is absent, and fails instead when
QKV_REQUIRE_DATA=1 (as in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def _require(what: str) -> None:
    msg = f"{what} not found; set QKV_DATA_DIR to the shared data folder"
    if os.environ.get("QKV_REQUIRE_DATA") == "1":
        pytest.fail(msg + " (QKV_REQUIRE_DATA=1)")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real-data folder (multi30k/, sst2/, tinyshakespeare/)."""
    root = os.environ.get("QKV_DATA_DIR")
    if not root or not Path(root).is_dir():
        _require(f"QKV_DATA_DIR={root!r}")
    return Path(root)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and lose much on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
