"""Ray Tune sweeps over the pretext task, ranked by the downstream probe, tracked in MLflow.

Mask probability, span length, codebook sizes and the Gumbel temperature schedule change
the pretext task itself, so the pretraining losses of two trials cannot be compared
(SPEC.md, last section). A sweep therefore ranks trials by the character error rate of
the frozen-encoder CTC probe (``pipeline/probe.py``) on held-out labelled data, and logs
the pretraining losses beside it.

A sweep file holds a base pretraining config, the deltas every trial shares, the sweep's
own settings and a search space keyed by the dotted config paths of the overrides::

    base: ../pretrain/laptop.yaml        # or ``preset: tiny``; relative to this file
    config:                              # deltas for every trial (dotted or nested)
      train.max_steps: 400
      probe.train_uri: demo_data/shards
    sweep:                               # SweepSettings below
      name: masking
      searcher: grid                     # grid | random | optuna
      max_concurrent_trials: 2
    space:                               # dotted config path -> one distribution
      model.mask.prob: {grid: [0.3, 0.65]}
      model.quantizer.entries: {grid: [64, 320]}

Distributions: ``grid: [values]`` (every value, crossed with the other grid keys),
``choice: [values]``, ``uniform: [low, high]``, ``loguniform: [low, high]``,
``integer: [low, high]`` (both ends included). Every key and every value a trial could
get is checked through :func:`pipeline.config.apply_overrides` before any trial starts.

How one trial runs (the Ray Train V2 pattern): the trial's driver starts its own
pretraining run (:func:`pipeline.train.trainer.run_pretraining`, its TorchTrainer fitted
in a child actor the driver owns, :class:`PretrainingRunner`) and meanwhile watches the
run's checkpoints. Each checkpoint holds the consolidated model (``model.safetensors``);
the driver probes it and reports ``probe_cer`` with the checkpoint's ``step`` to Tune,
where ASHA compares trials at equal steps and stops the weak ones; a stopped trial's
driver kills the child actor, which ends the run and frees its workers. Probing
checkpoints in the trial's driver rather than on training rank 0 keeps the training
workers busy while the probe runs, and needs nothing from the training loop.

Identity and faults: trial ``<id>`` of sweep ``<name>`` trains as run ``<name>-<id>``
under ``checkpoint.storage_path``; Tune keeps the sweep under
``<storage_path>/sweeps/<name>``. A failed trial is retried ``sweep.max_failures`` times
(resuming its run from the newest checkpoint), then recorded as failed while the sweep
goes on. Running the same sweep name again restores the sweep (``Tuner.restore``):
finished trials are kept, unfinished ones continue from their checkpoints.

MLflow: one parent run per sweep (``sweep-<name>``) with the settings, the summary table
and the plots; one child run per trial with its params, pretraining metrics and the probe
CER curve. The best trial's probed checkpoint is logged in Hugging Face format (plus the
resolved ``config.yaml``) and registered as a new version of ``sweep.register_as`` with
the alias ``best``.

The modules, one job each: :mod:`.spec` (the sweep file and its checks), :mod:`.trial`
(one trial's driver), :mod:`.results` (records, ranking, summary, plots),
:mod:`.registry` (the best model), :mod:`.run` (the sweep's driver), :mod:`.names`
(tags and names they share).
"""

from pipeline.tune.names import (
    BEST_ALIAS,
    DRIVER_TAG,
    METRIC_MODE,
    OUTCOME_TAG,
    PARENT_TAG,
    ROLE_TAG,
    SWEEP_TAG,
    TIME_ATTR,
    TRIAL_TAG,
    run_name_of,
)
from pipeline.tune.registry import register_best
from pipeline.tune.results import (
    SweepResult,
    TrialRecord,
    best_record,
    collect_records,
    finish_child_runs,
    format_table,
    sort_records,
    write_summary,
)
from pipeline.tune.run import SweepInterrupted, make_scheduler, make_searcher, run_sweep, search_space
from pipeline.tune.spec import (
    Dimension,
    SweepError,
    SweepSettings,
    SweepSpec,
    load_sweep,
    probe_cadence,
    validate_space,
    validate_sweep,
)
from pipeline.tune.trial import CheckpointProber, CheckpointRef, resolve_paths, trial_config, trial_main

__all__ = [
    "BEST_ALIAS", "DRIVER_TAG", "METRIC_MODE", "OUTCOME_TAG", "PARENT_TAG", "ROLE_TAG", "SWEEP_TAG", "TIME_ATTR",
    "TRIAL_TAG", "CheckpointProber", "CheckpointRef", "Dimension", "SweepError", "SweepInterrupted", "SweepResult",
    "SweepSettings", "SweepSpec", "TrialRecord", "best_record", "collect_records", "finish_child_runs",
    "format_table", "load_sweep", "make_scheduler", "make_searcher", "probe_cadence", "register_best",
    "resolve_paths", "run_name_of", "run_sweep", "search_space", "sort_records", "trial_config", "trial_main",
    "validate_space", "validate_sweep", "write_summary",
]
