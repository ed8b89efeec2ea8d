"""MLflow tracking: params are the dotted config, runs re-open by name, secrets never land."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline import config as C
from pipeline.tracking import MASK, Tracker, default_tracking_uri, install_log_redaction, redact, safe_params

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


def test_redact_shapes() -> None:
    assert redact("s3://bucket/x") == "s3://bucket/x"
    assert redact("http://alice:pa55word@host:5000/api") == f"http://{MASK}@host:5000/api"
    assert redact(f"id {KEY_ID} used", secrets=[]) == f"id {MASK} used"
    assert redact("url?token=abc123&x=1", secrets=[]) == f"url?token={MASK}&x=1"
    assert redact("anything", "data.secret_key") == MASK
    assert redact(f"prefix-{SECRET}", secrets=[SECRET]) == f"prefix-{MASK}"


def test_default_store_is_sqlite_beside_the_checkpoints(tmp_path: Path) -> None:
    cfg = C.apply_overrides(C.tiny(), [f"checkpoint.storage_path={tmp_path}"])
    assert default_tracking_uri(cfg) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    remote = C.apply_overrides(cfg, ["checkpoint.storage_path=s3://bucket/runs"])
    assert default_tracking_uri(remote).endswith("/.wavray/mlflow.db")
    assert default_tracking_uri(C.apply_overrides(cfg, ["tracking.uri=http://127.0.0.1:5000"])) == "http://127.0.0.1:5000"


def test_params_metrics_reopen_and_no_secret_anywhere(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    cfg = C.apply_overrides(C.tiny(), [
        f"checkpoint.storage_path={tmp_path}",
        f"data.train_uri=s3://bucket/{SECRET}/shards",
        "data.s3_endpoint=http://admin:hunter2hunter2@127.0.0.1:9",
        f"checkpoint.run_name=run-{KEY_ID}",
    ])
    tracker = Tracker.open(cfg, cfg.checkpoint.run_name)
    tracker.log_config(cfg)
    tracker.log_metrics(10, {"loss": 3.0, "perplexity/code_0": 20.0, "grad_norm": float("nan")})
    tracker.set_tag("alarm_chance_level", f"stuck; key {SECRET}")
    tracker.end()

    run = tracker.client.get_run(tracker.run_id)
    params = run.data.params
    assert params.keys() == safe_params(cfg).keys() == C.to_flat_dict(cfg).keys()
    assert params["model.mask.prob"] == "0.65" and params["train.max_steps"] == str(cfg.train.max_steps)
    assert params["data.train_uri"] == f"s3://bucket/{MASK}/shards"
    assert params["data.s3_endpoint"] == f"http://{MASK}@127.0.0.1:9"
    assert run.data.metrics["loss"] == 3.0 and "grad_norm" not in run.data.metrics
    assert run.info.status == "FINISHED"

    # Same name -> same run, running again; a changed param is kept as a tag.
    longer = C.apply_overrides(cfg, ["train.max_steps=999"])
    again = Tracker.open(longer, cfg.checkpoint.run_name)
    assert again.run_id == tracker.run_id
    again.log_config(longer)
    assert again.client.get_run(again.run_id).info.status == "RUNNING"
    assert again.client.get_run(again.run_id).data.tags["resumed.train.max_steps"] == "999"
    again.end()

    caplog.set_level(logging.INFO)
    install_log_redaction()
    logging.getLogger("wavray.test").warning("connecting with %s and %s", SECRET, KEY_ID)
    assert SECRET not in caplog.text and KEY_ID not in caplog.text and MASK in caplog.text

    # Nothing under the store (database, artifacts) holds a credential, in any table.
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "config.yaml" for p in files)
    for p in files:
        data = p.read_bytes()
        for secret in (SECRET, KEY_ID, "hunter2hunter2"):
            assert secret.encode() not in data, f"{secret[:4]}... found in {p}"


@pytest.mark.parametrize("key", ["data.secret_key", "tracking.password", "x.api_token"])
def test_secret_named_keys_are_masked(key: str) -> None:
    assert redact("value", key) == MASK
