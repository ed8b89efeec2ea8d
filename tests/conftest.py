"""Test set-up shared by every test.

The loopback variables of ``infra/loopback.env`` are set here, at import, so they hold
before any test starts Ray, the object store or MLflow.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_env_file(path: Path) -> None:
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("export "):
            continue
        for item in shlex.split(line[len("export "):]):
            key, _, value = item.partition("=")
            if "$(" in value:  # shell-computed default: decide here instead
                continue
            os.environ[key] = value


_load_env_file(ROOT / "infra" / "loopback.env")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# The real S3 object store (SeaweedFS on loopback), started once per session on first use.
pytest_plugins = ["fixtures.objectstore"]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op torch thread for the test: its budget is one core's time, on a shared
    machine extra threads only spin, and results do not depend on the core count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
