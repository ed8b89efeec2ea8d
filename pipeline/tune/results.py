"""What a sweep made of its trials: one record per trial joined from Tune and MLflow, the
ranking, the summary table and the plots."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.tune.names import OUTCOME_TAG, ROLE_TAG, SWEEP_TAG, TIME_ATTR, TRIAL_TAG, Outcome


@dataclass
class TrialRecord:
    """One trial as the sweep's summary sees it."""

    trial_id: str
    outcome: Outcome
    params: dict[str, Any]
    step: int | None = None
    """Updates at the last probed checkpoint."""
    loss: float = math.nan
    """Pretraining loss at that checkpoint (not comparable across pretext tasks)."""
    probe_cer: float = math.nan
    probe_wer: float = math.nan
    checkpoint_uri: str = ""
    run_id: str = ""
    error: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(step, probe CER) of every probed checkpoint."""
    train_seconds: float = math.nan
    """Seconds of training at the last probed checkpoint."""
    budget_spent: float | None = None
    """How much of the trial's budget it had spent there, 0-1: updates over
    ``train.max_steps``, or seconds over ``train.max_seconds`` when the sweep gives every
    trial a time budget. None: rank by updates (records made without a config)."""

    @property
    def progress(self) -> float:
        return self.budget_spent if self.budget_spent is not None else float(self.step or 0)

    def row(self, keys: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"trial": self.trial_id, "outcome": self.outcome}
        out.update({k: self.params.get(k, "") for k in keys})
        out.update({
            "steps": "" if self.step is None else self.step,
            "seconds": "" if math.isnan(self.train_seconds) else f"{self.train_seconds:.0f}",
            "loss": _fmt(self.loss), "probe_cer": _fmt(self.probe_cer), "probe_wer": _fmt(self.probe_wer),
            "run_id": self.run_id,
        })
        return out


def _fmt(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


@dataclass
class SweepResult:
    name: str
    keys: list[str]
    records: list[TrialRecord]
    best: TrialRecord | None
    model_name: str
    model_version: str | None
    parent_run_id: str
    tracking_uri: str
    experiment_path: str

    def table(self) -> str:
        return format_table(self.records, self.keys)


def format_table(records: list[TrialRecord], keys: list[str]) -> str:
    """The summary as a Markdown table, best first (:func:`sort_records`)."""
    rows = [r.row(keys) for r in sort_records(records)]
    header = ["trial", "outcome", *keys, "steps", "seconds", "loss", "probe_cer", "probe_wer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row[h]) for h in header) + " |")
    return "\n".join(lines)


def _rank_key(r: TrialRecord) -> tuple:
    scored = not math.isnan(r.probe_cer)
    return (not scored, -round(r.progress, 3), r.probe_cer if scored else 0.0, r.trial_id)


def sort_records(records: list[TrialRecord]) -> list[TrialRecord]:
    """Best first: the trials that spent the most of their budget by probe score, then the
    ones stopped earlier. With a time budget every finished trial spent all of it, so they
    compare by probe score whatever their update counts: an objective that costs more per
    update pays for it."""
    return sorted(records, key=_rank_key)


def best_record(records: list[TrialRecord]) -> TrialRecord | None:
    """The trial with the lowest probe CER among those that reached the most updates.

    Trials are compared at equal training budgets: a trial ASHA stopped early was already
    judged worse at its rung, and its score after fewer updates says nothing against a
    finished trial's. Failed trials and trials without a score are out.
    """
    scored = [r for r in records
              if r.outcome != "failed" and not math.isnan(r.probe_cer) and r.checkpoint_uri and r.step is not None]
    return min(scored, key=_rank_key) if scored else None


def _child_runs(client: Any, experiment_name: str, sweep: str) -> dict[str, Any]:
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return {}
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{ROLE_TAG}` = 'trial'",
        max_results=10_000,
    )
    return {r.data.tags.get(TRIAL_TAG, ""): r for r in runs}


def collect_records(result_grid: Any, client: Any, cfg: Config, sweep: str, keys: list[str]) -> list[TrialRecord]:
    """Join Tune's results with the trials' MLflow runs into one record per trial."""
    children = _child_runs(client, cfg.tracking.experiment, sweep)
    records = []
    for result in result_grid:
        trial_id = Path(result.path).name if result.path else ""
        metrics = result.metrics or {}
        trial_id = str(metrics.get("trial_id") or trial_id)
        params = {k: (result.config or {}).get(k) for k in keys}
        run = children.get(trial_id)
        curve: list[tuple[int, float]] = []
        if run is not None:
            history = client.get_metric_history(run.info.run_id, "probe/cer")
            curve = sorted({int(m.step): float(m.value) for m in history}.items())
        if result.error is not None:
            outcome: Outcome = "failed"
        elif metrics.get("trial_done"):
            outcome = "completed"
        else:
            outcome = "early_stopped"
        cer = float(metrics.get("probe_cer", math.nan))
        if math.isnan(cer) and curve:  # a final report that re-marked an already probed checkpoint
            cer = curve[-1][1]
        step = int(metrics[TIME_ATTR]) if TIME_ATTR in metrics else None
        seconds = float(metrics.get("train_seconds", math.nan))
        if cfg.train.max_seconds > 0:
            spent = min(1.0, seconds / cfg.train.max_seconds) if math.isfinite(seconds) else 0.0
            if outcome == "completed":
                spent = 1.0  # ended at its budget (or at max_steps, or when the data did: all it could get)
        else:
            spent = min(1.0, (step or 0) / cfg.train.max_steps)
        records.append(TrialRecord(
            trial_id=trial_id, outcome=outcome, params=params, step=step, train_seconds=seconds, budget_spent=spent,
            loss=float(metrics.get("loss", math.nan)), probe_cer=cer,
            probe_wer=float(metrics.get("probe_wer", math.nan)),
            checkpoint_uri=str(metrics.get("checkpoint_uri", "")),
            run_id=run.info.run_id if run is not None else str(metrics.get("mlflow_run_id", "")),
            error=_one_line(result.error) if result.error is not None else "",
            curve=curve,
        ))
    return records


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[-1][:500] if text else type(error).__name__


def finish_child_runs(client: Any, records: list[TrialRecord]) -> None:
    """Close every trial's run with its outcome (an early-stopped trial's driver is killed
    by Tune, so nobody else ends its run)."""
    status = {"completed": "FINISHED", "early_stopped": "KILLED", "failed": "FAILED"}
    for r in records:
        if not r.run_id:
            continue
        client.set_tag(r.run_id, OUTCOME_TAG, r.outcome)
        if r.error:
            client.set_tag(r.run_id, "wavray.sweep.error", r.error)
        run = client.get_run(r.run_id)
        if run.info.status in ("RUNNING", "SCHEDULED") or (r.outcome == "failed" and run.info.status != "FAILED"):
            client.set_terminated(r.run_id, status=status[r.outcome])


def write_summary(records: list[TrialRecord], keys: list[str], out_dir: Path) -> list[Path]:
    """``summary.csv``, ``summary.md`` and the plots of probe CER against each parameter and
    against the step, into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header = ["trial", "outcome", *keys, "steps", "seconds", "loss", "probe_cer", "probe_wer", "run_id"]
    csv_path = out_dir / "summary.csv"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for r in sort_records(records):
        writer.writerow(r.row(keys))
    csv_path.write_text(buf.getvalue())
    md_path = out_dir / "summary.md"
    md_path.write_text(
        format_table(records, keys) + "\n\nRanked by the probe CER at each trial's last probed checkpoint, "
        "furthest-trained trials first (a trial ASHA stopped early was judged at its rung); the pretraining "
        "losses of different pretext tasks are not comparable (SPEC.md).\n"
    )
    return [csv_path, md_path, *plot_summary(records, keys, out_dir)]


def plot_summary(records: list[TrialRecord], keys: list[str], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"completed": ("o", "tab:blue"), "early_stopped": ("x", "tab:orange"), "failed": ("s", "tab:red")}
    scored = [r for r in records if not math.isnan(r.probe_cer)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = [r.params.get(key) for r in scored]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric:
            xs: list[Any] = values
        else:
            labels = sorted({json.dumps(v) for v in values})
            xs = [labels.index(json.dumps(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        for outcome, (marker, color) in markers.items():
            pts = [(x, r.probe_cer) for x, r in zip(xs, scored, strict=True) if r.outcome == outcome]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=marker, color=color, label=outcome.replace("_", " "))
        ax.set_xlabel(key)
        ax.set_ylabel("probe CER (last probed checkpoint)")
        ax.grid(alpha=0.3)
    if scored:
        axes[0][0].legend(fontsize=7)
    fig.suptitle("Probe CER against each swept parameter")
    fig.tight_layout()
    vs_params = out_dir / "probe_cer_vs_params.png"
    fig.savefig(vs_params, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        if r.curve:
            steps, cers = zip(*r.curve, strict=True)
            style = "-" if r.outcome == "completed" else "--"
            ax.plot(steps, cers, style, marker=".", label=f"{r.trial_id} ({r.outcome.replace('_', ' ')})")
    ax.set_xlabel("pretraining update")
    ax.set_ylabel("probe CER")
    ax.grid(alpha=0.3)
    if any(r.curve for r in records):
        ax.legend(fontsize=6)
    ax.set_title("Probe CER during pretraining")
    fig.tight_layout()
    curves = out_dir / "probe_cer_curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    return [vs_params, curves]
