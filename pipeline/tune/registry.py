"""The best trial's model in the MLflow Model Registry."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline.config import CONFIG_FILE, Config
from pipeline.tune.names import BEST_ALIAS, SWEEP_TAG, TRIAL_TAG
from pipeline.tune.results import TrialRecord


def register_best(best: TrialRecord, cfg: Config, *, sweep: str, model_name: str, tracking_uri: str,
                  experiment: str) -> str:
    """Log the best trial's probed checkpoint as a bundle (``best_model``: its config, its
    weights, and ``hf_model/`` where Hugging Face has a class for it;
    :func:`pipeline.model_io.write_bundle`) on the trial's run, and register it as a new
    version of ``model_name`` with the alias ``best``. Idempotent: a version of this sweep
    for the same checkpoint is reused (a restored sweep registers nothing new)."""
    from pipeline.model_io import load_model, write_bundle
    from pipeline.tracking import Tracker, redact
    from pipeline.train.trainer import storage_for

    tracker = Tracker(tracking_uri, experiment, best.run_id)
    client = tracker.client
    version = None
    try:
        found = client.search_model_versions(f"name = '{model_name}'")
    except Exception:  # no such model yet
        found = []
    for mv in found:
        tags = mv.tags or {}
        if tags.get(SWEEP_TAG) == sweep and tags.get("wavray.checkpoint") == best.checkpoint_uri:
            version = str(mv.version)
    if version is None:
        trained = load_model(best.checkpoint_uri, task="pretraining", store=storage_for(cfg))
        trial_cfg = trained.config
        assert trial_cfg is not None  # a training checkpoint always holds its config
        with tempfile.TemporaryDirectory() as tmp:
            out = write_bundle(trained.model, trial_cfg, Path(tmp) / "best_model")
            (out / CONFIG_FILE).write_text(redact((out / CONFIG_FILE).read_text()))
            tracker.log_artifacts(out, "best_model")
        version = tracker.register_model(model_name, artifact_path="best_model")
        tags = {
            SWEEP_TAG: sweep, TRIAL_TAG: best.trial_id, "wavray.checkpoint": best.checkpoint_uri,
            "wavray.step": str(best.step), "probe_cer": f"{best.probe_cer:.6f}",
            "params": json.dumps(best.params, sort_keys=True),
        }
        for key, value in tags.items():
            client.set_model_version_tag(model_name, version, key, redact(value, key))
    client.set_registered_model_alias(model_name, BEST_ALIAS, version)
    return version
