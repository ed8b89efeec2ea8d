"""Names a sweep gives its runs, tags and Tune's bookkeeping, shared by its modules."""

from __future__ import annotations

from typing import Any, Literal

SWEEP_TAG = "wavray.sweep"
TRIAL_TAG = "wavray.trial_id"
ROLE_TAG = "wavray.sweep.role"
OUTCOME_TAG = "wavray.sweep.outcome"
PARENT_TAG = "mlflow.parentRunId"
DRIVER_TAG = "wavray.sweep.driver"
"""Where the trial's driver process runs, ``<node ip>:<pid>``: the process to look at (or
end) when a trial hangs. A retried trial overwrites it with its new driver."""
BEST_ALIAS = "best"
METRIC_MODE = "min"
TIME_ATTR = "step"
"""Tune compares trials at equal pretraining updates, the ``step`` of each report."""

Outcome = Literal["completed", "early_stopped", "failed"]


def run_name_of(sweep: str, trial_id: str) -> str:
    """The pretraining run (and child MLflow run) of a trial."""
    return f"{sweep}-{trial_id}"


def trial_dirname(trial: Any) -> str:
    """Tune's name and folder of a trial: its id, which the runs and MLflow tags carry too."""
    return str(trial.trial_id)
