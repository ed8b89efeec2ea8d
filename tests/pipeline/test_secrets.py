"""Credentials are resolved where they are used, never carried with the work.

With the object store running and its keys in the AWS variables (as a user's shell has
them), everything a job hands to Ray (the workers' ``train_loop_config``, the dataset
factory, the storage description every read task gets) is pickled here the way Ray
pickles it, and the secret must not be in the bytes. The end-to-end test of
``jobs.pretrain`` (tests/jobs/test_pretrain_e2e.py) checks the Ray instance's logs and
job and actor metadata after a real run.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import cloudpickle
import pytest
from fixtures.objectstore import S3Store

from pipeline.config import apply_overrides, tiny
from pipeline.data import storage
from pipeline.data.storage import Storage
from pipeline.tracking import Tracker
from pipeline.train.trainer import TrainDataFactory, loop_config, storage_for

pytestmark = pytest.mark.e2e


def test_nothing_shipped_to_ray_holds_a_credential(s3_store: S3Store, tmp_path: Path) -> None:
    cfg = apply_overrides(tiny(), [
        f"data.train_uri={s3_store.uri('data')}", f"data.s3_endpoint={s3_store.endpoint}",
        f"checkpoint.storage_path={s3_store.uri('runs')}",
    ])
    store = storage_for(cfg)
    run_uri = storage.join(cfg.checkpoint.storage_path, "r")
    shipped = {
        "storage": store,
        "train_loop_config": loop_config(cfg, run_uri=run_uri, store=store,
                                         tracker=Tracker(f"sqlite:///{tmp_path / 'm.db'}", "e", "run")),
        "data factory": TrainDataFactory(cfg.data, seed=0, num_workers=2, run_uri=run_uri, store=store),
    }
    for what, obj in shipped.items():
        blob = cloudpickle.dumps(obj)
        assert s3_store.secret_key.encode() not in blob, f"the secret key travels in the {what}"
        assert s3_store.access_key.encode() not in blob, f"the access key travels in the {what}"
    assert s3_store.secret_key not in repr(store)

    # The credentials are still found where the filesystem is opened: from the environment.
    storage.write_bytes(s3_store.uri("secrets/k"), b"v", store)
    assert storage.read_bytes(s3_store.uri("secrets/k"), pickle.loads(pickle.dumps(store))) == b"v"


def test_explicit_credentials_refuse_to_travel(s3_store: S3Store) -> None:
    given = Storage(endpoint=s3_store.endpoint, access_key=s3_store.access_key, secret_key=s3_store.secret_key)
    assert storage.exists(s3_store.uri(), given)  # usable in the process that made it
    with pytest.raises(TypeError, match="credentials are resolved where they are used"):
        cloudpickle.dumps(given)
