"""Fixtures of the data-path tests: a loopback Ray instance per module.

``s3_store`` (the real local S3 store) comes from ``tests/fixtures/objectstore.py``,
registered as a plugin in ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fixtures.objectstore import S3Store


@pytest.fixture(scope="module")
def ray_local(s3_store: S3Store) -> Iterator[None]:
    """One Ray instance per test module (start-up costs seconds), on 127.0.0.1, 2 CPUs.

    Depends on ``s3_store`` so the AWS variables are set before Ray starts its workers.
    """
    import ray

    from pipeline.cluster import connect_ray

    if ray.is_initialized():
        ray.shutdown()
    connect_ray(num_cpus=2, dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()
