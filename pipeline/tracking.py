"""MLflow tracking of a run: params, metrics, tags, artifacts, the model registry.

Only rank 0 of a training run talks to MLflow (through an ``MlflowClient`` bound to one
run id, no global active-run state), and the driver closes the run. The same run name
re-opens the same MLflow run, so a resumed or restarted run keeps one history (a metric
step logged twice keeps both points; the later one is the resumed run's).

The default store needs nothing started: ``sqlite:///<storage>/mlflow.db`` with
artifacts in ``<storage>/mlartifacts`` when ``checkpoint.storage_path`` is local, else
``~/.wavray/mlflow.db``. ``infra/mlflow_server.sh`` serves the same database for the UI
and the registry, or any ``tracking.uri`` (``http://127.0.0.1:5000``) can be given.

Credentials never reach MLflow or the logs: every param and tag value goes through
:func:`redact` (keys that name a secret, ``user:password@`` in URLs, AWS key shapes and
the values of secret environment variables are replaced by ``***``), and
:func:`install_log_redaction` filters log records the same way.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import CONFIG_FILE, Config, save_config, to_flat_dict

log = logging.getLogger("wavray.tracking")

RUN_NAME_TAG = "wavray.run_name"
HF_MODEL_ARTIFACT = "hf_model"
"""Where a run logs its model in Hugging Face format (and what the registry versions point at)."""
MASK = "***"
MAX_PARAM_CHARS = 6000
_SECRET_KEY_RE = re.compile(
    r"(secret|passw(or)?d|token|credential|access[_-]?key|private[_-]?key|api[_-]?key|session[_-]?key|auth)",
    re.IGNORECASE,
)
_SECRET_VALUE_RES = (
    re.compile(r"(?<=://)[^/@\s:]*:[^/@\s]*(?=@)"),  # scheme://user:password@host
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"(?i)((?:secret|password|passwd|token|api[_-]?key)\s*[=:]\s*)[^\s,;&]+"),
)
_MIN_SECRET_LEN = 6


def secret_env_values() -> list[str]:
    """Values of environment variables whose names say they are secret (AWS_* keys included)."""
    names = {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
             "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN"}
    values = {
        v for k, v in os.environ.items()
        if (k in names or _SECRET_KEY_RE.search(k)) and len(v) >= _MIN_SECRET_LEN
    }
    return sorted(values, key=len, reverse=True)


def redact(value: Any, key: str = "", *, secrets: list[str] | None = None) -> str:
    """``value`` as a string with anything secret-looking replaced by ``***``."""
    text = "" if value is None else str(value)
    if key and _SECRET_KEY_RE.search(key.rsplit(".", 1)[-1]) and text:
        return MASK
    for s in secrets if secrets is not None else secret_env_values():
        text = text.replace(s, MASK)
    text = _SECRET_VALUE_RES[0].sub(MASK, text)
    text = _SECRET_VALUE_RES[1].sub(MASK, text)
    text = _SECRET_VALUE_RES[2].sub(lambda m: m.group(1) + MASK, text)
    return text


def safe_params(cfg: Config) -> dict[str, str]:
    """The flattened dotted config (``model.mask.prob`` ...) as MLflow params, redacted."""
    secrets = secret_env_values()
    out = {}
    for key, value in to_flat_dict(cfg).items():
        out[key] = redact(value, key, secrets=secrets)[:MAX_PARAM_CHARS]
    return out


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with :func:`redact` (args merged first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler to report
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_log_redaction() -> None:
    """Redact secrets in every record of the root and ``wavray`` loggers' handlers."""
    flt = RedactingFilter()
    for logger in (logging.getLogger(), logging.getLogger("wavray")):
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(flt)
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(flt)


def default_tracking_uri(cfg: Config) -> str:
    """``tracking.uri`` or the sqlite store beside the checkpoints (module doc)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    storage = cfg.checkpoint.storage_path
    if "://" in storage:
        base = Path.home() / ".wavray"
    else:
        base = Path(storage).expanduser().resolve()
    return f"sqlite:///{base / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


class Tracker:
    """One MLflow run, addressed by id; safe to pickle (reconnects lazily)."""

    def __init__(self, uri: str, experiment: str, run_id: str) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_id = run_id
        self._c: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "experiment": self.experiment, "run_id": self.run_id, "_c": None}

    @property
    def client(self) -> Any:
        if self._c is None:
            self._c = _client(self.uri)
        return self._c

    @classmethod
    def open(cls, cfg: Config, run_name: str) -> Tracker:
        """Create the run named ``run_name``, or re-open it (same name = same run)."""
        uri = default_tracking_uri(cfg)
        client = _client(uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            exp_id = client.create_experiment(cfg.tracking.experiment, artifact_location=_artifact_root(uri))
        else:
            exp_id = exp.experiment_id
        name = redact(run_name)  # the name is stored: a secret typed into it must not be
        found = client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'", max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
        else:
            run = client.create_run(exp_id, run_name=name, tags={RUN_NAME_TAG: name})
            run_id = run.info.run_id
        tracker = cls(uri, cfg.tracking.experiment, run_id)
        tracker._c = client
        return tracker

    def log_config(self, cfg: Config) -> None:
        """Params (flattened dotted config) and the resolved ``config.yaml`` artifact.

        Params are immutable in MLflow: a resumed run re-logs only the ones not yet there
        (a changed value, e.g. a longer ``train.max_steps``, goes to a ``resumed.*`` tag).
        """
        from mlflow.entities import Param

        params = safe_params(cfg)
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        for k, v in params.items():
            if k in existing and existing[k] != v:
                self.set_tag(f"resumed.{k}", v)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CONFIG_FILE
            save_config(cfg, path)
            path.write_text(redact(path.read_text()))
            self.client.log_artifact(self.run_id, str(path))

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(_metric_key(k), float(v), now, step) for k, v in metrics.items()
            if isinstance(v, (int, float)) and v == v  # NaN: nothing measured in the interval
        ]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 500])

    def set_tag(self, key: str, value: Any) -> None:
        self.client.set_tag(self.run_id, key, redact(value, key))

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run (``FINISHED``, ``FAILED`` or ``KILLED``)."""
        self.client.set_terminated(self.run_id, status=status)

    def register_model(self, name: str, artifact_path: str = HF_MODEL_ARTIFACT) -> str:
        """Register the run's ``artifact_path`` as a new version of model ``name``; returns the version."""
        client = self.client
        try:
            client.get_registered_model(name)
        except Exception:
            client.create_registered_model(name)
        source = f"{client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        mv = client.create_model_version(name, source, run_id=self.run_id)
        return str(mv.version)

    def ui_command(self) -> str:
        """How to look at this store in a browser."""
        if self.uri.startswith(("http://", "https://")):
            return f"open {self.uri}"
        return f"bash infra/mlflow_server.sh start --backend-store-uri {self.uri}"


def _metric_key(key: str) -> str:
    # MLflow accepts letters, digits, _ - . space / ; keep the loop's names readable.
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)


MODEL_ARTIFACT = "model"
"""Where a run logs a model Hugging Face has no pretraining class for: a wavray bundle
(``pipeline.model_io.write_bundle``)."""


def final_model_artifact(cfg: Config) -> str:
    """The artifact a pretraining run logs its final model as (and registers)."""
    from models.hf import hf_unsupported

    if cfg.model.objective == "wav2vec2" and not hf_unsupported(cfg.model):
        return HF_MODEL_ARTIFACT
    return MODEL_ARTIFACT


def log_final_model(tracker: Tracker, model: Any, cfg: Config) -> str:
    """The trained model as a run artifact (:func:`final_model_artifact`): wav2vec 2.0 on the
    conv front end as a Hugging Face ``Wav2Vec2(Conformer)ForPreTraining`` directory, any
    other model as a wavray bundle (its checkpoint files, and its encoder in Hugging Face
    format where one maps). Returns the artifact path."""
    from models.hf import save_hf_pretraining
    from pipeline.model_io import write_bundle

    artifact = final_model_artifact(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / artifact
        if artifact == HF_MODEL_ARTIFACT:
            save_hf_pretraining(model, cfg.model, out, normalize=cfg.data.normalize)
        else:
            write_bundle(model, cfg, out)
            (out / CONFIG_FILE).write_text(redact((out / CONFIG_FILE).read_text()))
        tracker.log_artifacts(out, artifact)
    return artifact
