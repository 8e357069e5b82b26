"""Shared fixtures. Real data comes from QKV_DATA_DIR (the Makefile points it at
../shared/data); a test that needs it skips when it is absent, and fails instead when
QKV_REQUIRE_DATA=1 (as in CI)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

from qkv import kernel


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


def _cpu_has(flag: str) -> bool:
    try:
        return any(line.startswith("flags") and f" {flag} " in line + " "
                   for line in open("/proc/cpuinfo"))
    except OSError:
        return False


@pytest.fixture(scope="session")
def avx2_library(tmp_path_factory):
    """The compiled kernels built for AVX2 (CI may run on a CPU without AVX-512), loaded;
    skips off x86-64 CPUs with AVX2, or when the kernels are unavailable here."""
    if platform.machine() != "x86_64" or not _cpu_has("avx2"):
        pytest.skip("needs an x86-64 CPU with AVX2")
    if not kernel.available():
        pytest.skip("the compiled kernels are unavailable here (QKV_KERNEL=0 or no compiler)")
    flags = ["-march=x86-64-v3" if f == "-march=native" else f for f in kernel.FLAGS]
    target = tmp_path_factory.mktemp("avx2") / "avx2.so"
    done = subprocess.run([os.environ.get("CC", "cc"), *flags, *map(str, kernel.SOURCES),
                           "-o", str(target), "-lm"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return kernel._load(target)
