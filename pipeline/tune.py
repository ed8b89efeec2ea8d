"""Ray Tune sweeps over the pretext task, ranked by the downstream probe, tracked in MLflow.

Mask probability, span length, codebook sizes and the Gumbel temperature schedule change
the pretext task itself, so the pretraining losses of two trials cannot be compared
(SPEC.md, last section). A sweep therefore ranks trials by the character error rate of
the frozen-encoder CTC probe (``pipeline/probe.py``) on held-out labelled data, and logs
the pretraining losses beside it.

A sweep file holds a base pretraining config, the deltas every trial shares, the sweep's
own settings and a search space keyed by the dotted config paths of the overrides::

    base: ../pretrain/tiny.yaml          # or ``preset: tiny``; relative to this file
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
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config import (
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    parse_override,
    preset_config,
    save_config,
    to_dict,
)

log = logging.getLogger("wavray.tune")

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

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "integer")
TOP_LEVEL_KEYS = ("base", "preset", "config", "sweep", "space")
FIXED_PREFIXES = ("probe.", "checkpoint.", "tracking.", "preset")
"""Paths a search space must not vary: the probe is the yardstick every trial is measured
with; run identity and tracking belong to the sweep."""
PATH_FIELDS = ("data.train_uri", "probe.train_uri", "probe.dev_uri", "checkpoint.storage_path", "train.init_from")
"""Local paths made absolute in the driver: Tune runs each trial in its own directory."""
MAX_GRID_CHECK = 512

Outcome = Literal["completed", "early_stopped", "failed"]


class SweepError(ConfigError):
    """A sweep file, setting or search space that cannot be used; raised before any trial."""


class SweepInterrupted(RuntimeError):
    """The sweep stopped before its trials finished; running it again resumes it."""


# --- the sweep file ----------------------------------------------------------------------------


@dataclass(kw_only=True)
class SweepSettings:
    """How the search runs (the ``sweep:`` section of a sweep file)."""

    name: str = ""
    """Names the sweep's storage folder and MLflow runs; running the same name again resumes
    it. Empty: the sweep file's name."""
    searcher: Literal["grid", "random", "optuna"] = "grid"
    """``grid``: every combination of the ``grid`` values; ``random``: ``num_samples`` draws;
    ``optuna``: Optuna's TPE, which proposes each trial from the probe CERs so far."""
    num_samples: int = 1
    """``grid``: repetitions of the whole grid; ``random``/``optuna``: trials."""
    max_concurrent_trials: int = 1
    """Trials running at once; each takes ``scaling.num_workers`` workers plus its driver."""
    metric: Literal["probe_cer", "probe_wer"] = "probe_cer"
    """The probe score trials are ranked and stopped by (lower is better)."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """``asha``: stop trials whose probe score is in the worse part at a rung; ``fifo``: run
    every trial to ``train.max_steps``."""
    grace_period: int = 0
    """ASHA: updates every trial gets before it can be stopped; 0: the probe cadence."""
    reduction_factor: float = 3.0
    """ASHA: the best 1/reduction_factor of the trials at a rung go on."""
    seed: int = 0
    """Seeds the random and Optuna searchers (the same seed proposes the same trials)."""
    max_failures: int = 1
    """Retries of a failed trial (each resumes its run from the newest checkpoint) before
    it is recorded as failed; the sweep goes on either way."""
    trial_cpus: float = 0.25
    """CPUs reserved for each trial's driver, which probes the checkpoints."""
    trial_gpus: float = 0.0
    """GPUs for each trial's driver (the probe runs on the GPU when > 0)."""
    register_as: str = ""
    """Model Registry name of the best trial's model; empty: ``wavray-<name>``."""
    poll_seconds: float = 2.0
    """How often a trial's driver looks for a new checkpoint to probe."""

    def __post_init__(self) -> None:
        if self.searcher not in ("grid", "random", "optuna"):
            raise ValueError(f"sweep.searcher: expected 'grid', 'random' or 'optuna', got {self.searcher!r}")
        if self.scheduler not in ("asha", "fifo"):
            raise ValueError(f"sweep.scheduler: expected 'asha' or 'fifo', got {self.scheduler!r}")
        if self.metric not in ("probe_cer", "probe_wer"):
            raise ValueError(f"sweep.metric: expected 'probe_cer' or 'probe_wer', got {self.metric!r}")
        for name in ("num_samples", "max_concurrent_trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"sweep.{name}: expected >= 1, got {getattr(self, name)}")
        if self.grace_period < 0:
            raise ValueError(f"sweep.grace_period: expected >= 0, got {self.grace_period}")
        if self.reduction_factor <= 1:
            raise ValueError(f"sweep.reduction_factor: expected > 1, got {self.reduction_factor}")
        if self.max_failures < 0:
            raise ValueError(f"sweep.max_failures: expected >= 0, got {self.max_failures}")
        if self.trial_cpus <= 0:
            # Ray refuses a trial that reserves nothing ({"CPU": 0}); a small fraction works.
            raise ValueError(f"sweep.trial_cpus: expected > 0 (a fraction such as 0.25 is fine), got {self.trial_cpus}")
        if self.trial_gpus < 0:
            raise ValueError(f"sweep.trial_gpus: expected >= 0, got {self.trial_gpus}")
        if self.poll_seconds <= 0:
            raise ValueError(f"sweep.poll_seconds: expected > 0, got {self.poll_seconds}")
        if self.name and not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"sweep.name: expected letters, digits, '-', '_' or '.', got {self.name!r}")

    @property
    def model_name(self) -> str:
        return self.register_as or f"wavray-{self.name}"


@dataclass(frozen=True)
class Dimension:
    """One searched config path and its distribution."""

    key: str
    kind: str
    values: tuple[Any, ...]
    """``grid``/``choice``: the values; ranges: (low, high)."""

    @classmethod
    def parse(cls, key: str, spec: Any) -> Dimension:
        where = f"space.{key}"
        if not isinstance(spec, Mapping) or len(spec) != 1:
            raise SweepError(
                f"{where}: expected one distribution such as {{grid: [0.3, 0.65]}} or {{uniform: [0.3, 0.8]}} "
                f"(one of {', '.join(DISTRIBUTIONS)}), got {spec!r}"
            )
        ((kind, values),) = spec.items()
        if kind not in DISTRIBUTIONS:
            raise SweepError(f"{where}: unknown distribution {kind!r}; expected one of {', '.join(DISTRIBUTIONS)}")
        if not isinstance(values, list | tuple) or not values:
            raise SweepError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform", "integer"):
            if len(values) != 2:
                raise SweepError(f"{where}.{kind}: expected [low, high], got {values!r}")
            low, high = values
            number = int if kind == "integer" else (int, float)
            if any(isinstance(v, bool) or not isinstance(v, number) for v in values):
                expected = "integers" if kind == "integer" else "numbers"
                raise SweepError(f"{where}.{kind}: expected {expected} [low, high], got {values!r}")
            if (kind == "integer" and low > high) or (kind != "integer" and low >= high):
                raise SweepError(f"{where}.{kind}: expected low < high, got {values!r}")
            if kind == "loguniform" and low <= 0:
                raise SweepError(f"{where}.loguniform: expected low > 0, got {values!r}")
        return cls(key=key, kind=kind, values=tuple(values))

    def candidates(self) -> list[Any]:
        """Values that stand for every value a trial can get (ranges: both ends)."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        if self.kind == "integer":
            return [int(self.values[0]), int(self.values[1])]
        return [float(self.values[0]), float(self.values[1])]

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(float(self.values[0]), float(self.values[1]))
        if self.kind == "loguniform":
            return tune.loguniform(float(self.values[0]), float(self.values[1]))
        return tune.randint(int(self.values[0]), int(self.values[1]) + 1)  # Tune excludes the upper end

    def describe(self) -> str:
        return f"{self.kind} {list(self.values)}"


@dataclass
class SweepSpec:
    """A loaded sweep: the base config every trial starts from, the settings, the space."""

    config: Config
    """The base pretraining config with the file's and the command line's deltas."""
    settings: SweepSettings
    space: list[Dimension]
    source: str = ""
    """The sweep file (for messages and the parent run's artifacts)."""

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.space]


def _settings_from(data: Mapping[str, Any], where: str) -> SweepSettings:
    from pipeline.config import _coerce, _field_types  # the one type checker of config values

    types_ = _field_types(SweepSettings)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            raise SweepError(f"unknown sweep setting 'sweep.{key}'{where}: valid keys are: {', '.join(sorted(types_))}")
        try:
            kwargs[key] = _coerce(f"sweep.{key}", types_[key], value)
        except ConfigError as e:
            raise SweepError(f"{e}{where}") from None
    try:
        return SweepSettings(**kwargs)
    except ValueError as e:
        raise SweepError(f"{e}{where}") from None


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read a sweep file; ``overrides`` are ``a.b.c=value`` for the base config,
    ``sweep.<setting>=value`` for the settings, ``space.<path>={grid: [...]}`` for the space.

    Everything is checked here, before any trial starts (:func:`validate_space`).
    """
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"sweep file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SweepError(f"sweep file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SweepError(f"sweep file {str(p)!r}: expected a mapping at the top level")
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise SweepError(
            f"sweep file {str(p)!r}: unknown top-level key(s) {unknown}; valid keys are: {', '.join(TOP_LEVEL_KEYS)}"
        )
    where = f" (in {p})"
    if data.get("base") and data.get("preset"):
        raise SweepError(f"sweep file {str(p)!r}: give 'base' (a pretraining config file) or 'preset', not both")
    for name in ("config", "sweep", "space"):
        if not isinstance(data.get(name) or {}, Mapping):
            raise SweepError(f"sweep file {str(p)!r}: '{name}' must be a mapping, got {type(data[name]).__name__}")
    config_deltas = dict(data.get("config") or {})
    settings_data = dict(data.get("sweep") or {})
    space_data = dict(data.get("space") or {})

    base_overrides: list[tuple[str, Any]] = []
    for text in overrides or []:
        key, value = parse_override(text)
        if key.startswith("sweep."):
            settings_data[key[len("sweep."):]] = value
        elif key.startswith("space."):
            space_data[key[len("space."):]] = value
        else:
            base_overrides.append((key, value))

    try:
        if data.get("base"):
            base_path = Path(data["base"])
            if not base_path.is_absolute():
                base_path = (p.parent / base_path).resolve()
            cfg = load_config(base_path)
        else:
            cfg = preset_config(str(data.get("preset") or "tiny"))
        cfg = apply_overrides(cfg, dict(config_deltas))
    except ConfigError as e:
        raise SweepError(f"{e}{where}") from None
    try:
        cfg = apply_overrides(cfg, dict(base_overrides))
    except ConfigError as e:
        raise SweepError(f"{e} (command line)") from None

    settings_data.setdefault("name", p.stem.replace("_", "-"))
    settings = _settings_from(settings_data, where)
    space = [Dimension.parse(key, spec) for key, spec in space_data.items()]
    spec = SweepSpec(config=cfg, settings=settings, space=space, source=str(p))
    validate_sweep(spec)
    return spec


def validate_space(cfg: Config, space: list[Dimension], searcher: str = "grid") -> None:
    """Check every key and every value a trial could get against the config tree.

    Each key is applied with each of its candidate values (ranges: both ends) through
    :func:`apply_overrides`, whose error names an unknown key and lists the valid ones;
    a grid is checked combination by combination (cross-field rules such as groups
    dividing the codevector dimension), other searchers with all-low and all-high picks.
    """
    if not space:
        raise SweepError("space: expected at least one dotted config path to search, got none")
    for dim in space:
        if dim.key.startswith(FIXED_PREFIXES):
            raise SweepError(
                f"space.{dim.key}: the sweep fixes {', '.join(p.rstrip('.') for p in FIXED_PREFIXES)} for every "
                "trial (the probe is the yardstick; run names and tracking belong to the sweep); put it in 'config'"
            )
        for value in dim.candidates():
            try:
                apply_overrides(cfg, {dim.key: value})
            except ConfigError as e:
                raise SweepError(f"space.{dim.key} = {value!r}: {e}") from None
    if searcher == "grid":
        not_grid = [d.key for d in space if d.kind != "grid"]
        if not_grid:
            raise SweepError(f"space: searcher 'grid' needs every key as {{grid: [...]}}; not a grid: {not_grid}")
    else:
        grids = [d.key for d in space if d.kind == "grid"]
        if grids:
            raise SweepError(
                f"space: searcher {searcher!r} samples its trials; use choice/uniform/loguniform/integer for {grids} "
                "(or searcher: grid)"
            )
    combos: list[dict[str, Any]]
    sizes = [len(d.candidates()) for d in space]
    if searcher == "grid" and math.prod(sizes) <= MAX_GRID_CHECK:
        combos = [dict(zip([d.key for d in space], values, strict=True))
                  for values in itertools.product(*[d.candidates() for d in space])]
    else:
        combos = [{d.key: d.candidates()[0] for d in space}, {d.key: d.candidates()[-1] for d in space}]
    for combo in combos:
        try:
            apply_overrides(cfg, combo)
        except ConfigError as e:
            raise SweepError(f"space: the combination {combo} is not a valid config: {e}") from None


def probe_cadence(cfg: Config) -> int:
    """Updates between probed checkpoints: ``probe.every_steps``, else every checkpoint."""
    return cfg.probe.every_steps or cfg.checkpoint.every_steps


def validate_sweep(spec: SweepSpec) -> None:
    """Everything a sweep needs from its base config, checked before any trial starts."""
    cfg, s = spec.config, spec.settings
    validate_space(cfg, spec.space, s.searcher)
    if not cfg.data.train_uri:
        raise SweepError("data.train_uri: expected the prepared dataset the trials pretrain on, got ''")
    if not cfg.probe.train_uri:
        raise SweepError(
            "probe.train_uri: a sweep ranks trials by the downstream probe (SPEC.md); expected a prepared "
            "dataset with transcripts, got ''"
        )
    dev_uri = cfg.probe.dev_uri or cfg.probe.train_uri
    if dev_uri == cfg.probe.train_uri and (
        cfg.probe.dev_split == cfg.probe.train_split or "all" in (cfg.probe.dev_split, cfg.probe.train_split)
    ):
        raise SweepError(
            f"probe.dev_split: the probe's dev set must be held out from its training set; both read "
            f"{cfg.probe.train_uri!r} with splits {cfg.probe.train_split!r} and {cfg.probe.dev_split!r}"
        )
    every = cfg.checkpoint.every_steps
    if cfg.probe.every_steps and cfg.probe.every_steps % every:
        raise SweepError(
            f"probe.every_steps: the sweep probes checkpoints, so it must be a multiple of checkpoint.every_steps "
            f"({every}), got {cfg.probe.every_steps}"
        )
    if probe_cadence(cfg) > cfg.train.max_steps:
        raise SweepError(
            f"checkpoint.every_steps ({every}) / probe.every_steps: expected at most train.max_steps "
            f"({cfg.train.max_steps}), so that ASHA sees probe scores before the end"
        )
    if s.scheduler == "asha" and s.grace_period > cfg.train.max_steps:
        raise SweepError(
            f"sweep.grace_period: expected at most train.max_steps ({cfg.train.max_steps}), got {s.grace_period}"
        )


# --- paths, names, the trial's config ---------------------------------------------------------


def _absolute(value: str) -> str:
    if not value or "://" in value:
        return value
    return str(Path(value).expanduser().resolve())


def resolve_paths(cfg: Config) -> Config:
    """Local paths made absolute (Tune runs trials in their own directories) and the
    tracking URI fixed, so every trial and the sweep share one MLflow store."""
    from pipeline.tracking import default_tracking_uri

    deltas: dict[str, Any] = {}
    for key in PATH_FIELDS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and "://" not in value:
            deltas[key] = _absolute(value)
    out = apply_overrides(cfg, deltas)
    uri = default_tracking_uri(out)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + _absolute(uri[len("sqlite:///"):])
    return apply_overrides(out, {"tracking.uri": uri})


def run_name_of(sweep: str, trial_id: str) -> str:
    """The pretraining run (and child MLflow run) of a trial."""
    return f"{sweep}-{trial_id}"


def trial_config(base: Config, params: Mapping[str, Any], *, sweep: str, trial_id: str) -> Config:
    """The config of one trial: the base, the trial's searched values, its own run name, and
    no registration of its own (the sweep registers the best trial)."""
    cfg = apply_overrides(base, dict(params))
    return apply_overrides(cfg, {"checkpoint.run_name": run_name_of(sweep, trial_id), "tracking.register_as": ""})


def _trial_dirname(trial: Any) -> str:
    return str(trial.trial_id)


def _trial_name(trial: Any) -> str:
    return str(trial.trial_id)


# --- the probe on checkpoints -------------------------------------------------------------------


def probe_sets(cfg: Config) -> tuple[Any, Any]:
    """(train, dev) labelled sets of ``cfg.probe``: the first minutes of seeded shuffles."""
    from pipeline.probe import load_labelled_set

    p = cfg.probe
    common = {"s3_endpoint": cfg.data.s3_endpoint, "s3_region": cfg.data.s3_region}
    train = load_labelled_set(p.train_uri, split=p.train_split, **common).take_minutes(p.train_minutes, seed=p.seed)
    dev = load_labelled_set(p.dev_uri or p.train_uri, split=p.dev_split, **common).take_minutes(
        p.dev_minutes, seed=p.seed
    )
    return train, dev


@dataclass
class CheckpointRef:
    uri: str
    step: int
    metrics: dict[str, float]


class CheckpointProber:
    """Finds a run's newest checkpoint and scores its model with the probe."""

    def __init__(self, cfg: Config, run_uri: str, train_set: Any, dev_set: Any, device: str = "cpu") -> None:
        from pipeline.train.trainer import storage_for

        self.cfg = cfg
        self.run_uri = run_uri
        self.store = storage_for(cfg)
        self.train_set = train_set
        self.dev_set = dev_set
        self.device = device

    def newest(self) -> CheckpointRef | None:
        """The newest checkpoint Ray Train recorded for the run (None before the first)."""
        from pipeline.train.trainer import latest_checkpoint_uri, read_trainer_state

        try:
            uri = latest_checkpoint_uri(self.run_uri, self.store)
            if uri is None:
                return None
            state = read_trainer_state(uri, self.store)
        except (OSError, ValueError, RuntimeError) as e:  # not written yet, or being rotated out
            log.debug("no readable checkpoint under %s yet: %s", self.run_uri, e)
            return None
        return CheckpointRef(uri=uri, step=int(state.step), metrics=dict(state.metrics))

    def load_model(self, ref: CheckpointRef) -> Any:
        """The pretraining model with the checkpoint's consolidated weights."""
        from safetensors.torch import load as load_safetensors

        from models.checkpoint import WEIGHTS_NAME, clean_state_dict
        from models.factory import build_pretraining_model
        from pipeline.data import storage

        data = storage.read_bytes(storage.join(ref.uri, WEIGHTS_NAME), self.store)
        model = build_pretraining_model(self.cfg.model)
        model.load_state_dict(clean_state_dict(load_safetensors(data)))
        return model.eval()

    def probe(self, ref: CheckpointRef) -> dict[str, float]:
        from pipeline.probe import run_probe

        model = self.load_model(ref).to(self.device)
        return run_probe(model, self.train_set, self.dev_set, self.cfg.probe,
                         normalize=self.cfg.data.normalize, device=self.device)


def tune_report(ref: CheckpointRef, probe: Mapping[str, float], *, done: bool, run_id: str) -> dict[str, Any]:
    """What a trial reports to Tune: the probe score at ``step`` and the loss beside it."""
    m = ref.metrics
    return {
        TIME_ATTR: ref.step,
        "probe_cer": float(probe["probe/cer"]),
        "probe_wer": float(probe["probe/wer"]),
        "probe_dev_loss": float(probe["probe/dev_loss"]),
        "loss": float(m.get("loss", math.nan)),
        "loss_contrastive": float(m.get("loss/contrastive", math.nan)),
        "accuracy": float(m.get("accuracy", math.nan)),
        "checkpoint_uri": ref.uri,
        "mlflow_run_id": run_id,
        "trial_done": done,
    }


# --- one trial ------------------------------------------------------------------------------------


@dataclass
class TrialContext:
    """What every trial's driver needs from the sweep (small and picklable)."""

    sweep: str
    base: dict[str, Any]
    """The resolved base config as a dict."""
    parent_run_id: str
    trial_cpus: float
    trial_gpus: float
    poll_seconds: float


class PretrainingRunner:
    """Runs one trial's pretraining in its own Ray actor, owned by the trial's driver.

    Ray Train's controller belongs to whichever process calls ``fit()``. Calling it from
    this actor rather than from the driver lets the driver end the run the moment Tune
    stops the trial (ASHA) or the trial fails: killing this actor takes the controller and
    its workers with it, and the controller's placement group is released. A Tune trial
    that is merely told to stop would otherwise train to the end in the background.
    """

    def run(self, config: dict[str, Any], run_name: str) -> str:
        from pipeline.train.trainer import run_pretraining

        return run_pretraining(from_dict(config), run_name=run_name).run_name


def open_trial_run(cfg: Config, ctx: TrialContext, trial_id: str, params: Mapping[str, Any]) -> Any:
    """The trial's MLflow run, created before the pretraining so that it starts as a child
    of the sweep's run; the pretraining re-opens it by its run name."""
    from pipeline.tracking import Tracker

    tracker = Tracker.open(cfg, cfg.checkpoint.run_name)
    client = tracker.client
    client.set_tag(tracker.run_id, PARENT_TAG, ctx.parent_run_id)
    client.set_tag(tracker.run_id, SWEEP_TAG, ctx.sweep)
    client.set_tag(tracker.run_id, TRIAL_TAG, trial_id)
    client.set_tag(tracker.run_id, ROLE_TAG, "trial")
    client.set_tag(tracker.run_id, "wavray.sweep.params", json.dumps(dict(params), sort_keys=True))
    client.set_tag(tracker.run_id, DRIVER_TAG, f"{_node_ip()}:{os.getpid()}")
    return tracker


def _node_ip() -> str:
    import ray

    try:
        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (a trial function called directly)
        return "local"


def trial_main(params: dict[str, Any], ctx: TrialContext) -> None:
    """The function Tune runs for each trial (its driver): pretrain, probe, report."""
    import ray
    import torch
    from ray import tune

    from pipeline.data import storage

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(from_dict(ctx.base), params, sweep=ctx.sweep, trial_id=trial_id)
    run_name = cfg.checkpoint.run_name
    run_uri = storage.join(cfg.checkpoint.storage_path, run_name)
    tracker = open_trial_run(cfg, ctx, trial_id, params)
    # The driver has a fraction of a CPU: more threads would only fight the trainers.
    torch.set_num_threads(max(1, math.ceil(ctx.trial_cpus)))
    device = "cuda" if ctx.trial_gpus > 0 and torch.cuda.is_available() else "cpu"
    train_set, dev_set = probe_sets(cfg)
    prober = CheckpointProber(cfg, run_uri, train_set, dev_set, device)
    every = probe_cadence(cfg)

    def probe_and_report(ref: CheckpointRef, done: bool) -> dict[str, float]:
        scores = prober.probe(ref)
        try:
            tracker.log_metrics(ref.step, scores)
            tracker.set_tag("wavray.sweep.last_probed", ref.uri)
        except Exception as e:  # tracking must not stop the trial
            log.warning("MLflow logging of the probe at step %d failed: %s", ref.step, e)
        print(f"[wavray] trial {trial_id} step {ref.step}: probe CER {scores['probe/cer']:.4f} "
              f"(pretraining loss {ref.metrics.get('loss', math.nan):.4f})", flush=True)
        tune.report(tune_report(ref, scores, done=done, run_id=tracker.run_id))
        return scores

    runner = ray.remote(num_cpus=0, max_restarts=0)(PretrainingRunner).remote()
    done_ref = runner.run.remote(to_dict(cfg), run_name)
    try:
        last: tuple[CheckpointRef, dict[str, float]] | None = None
        while not ray.wait([done_ref], timeout=ctx.poll_seconds)[0]:
            ref = prober.newest()
            fresh = last is None or (ref is not None and ref.step > last[0].step)
            if ref is not None and fresh and ref.step % every == 0 and ref.step < cfg.train.max_steps:
                last = (ref, probe_and_report(ref, done=False))
        ray.get(done_ref)  # the run's own error, if any, fails the trial (Tune retries it)
        final = prober.newest()
        if final is None:
            raise RuntimeError(f"trial {trial_id}: the run {run_uri} finished without a checkpoint to probe")
        if last is not None and final.step <= last[0].step:
            # The data ended right after a probed checkpoint: that score is the final one.
            tune.report(tune_report(last[0], last[1], done=True, run_id=tracker.run_id))
        else:
            probe_and_report(final, done=True)
    finally:
        # Stopped by the scheduler (tune.report raised SystemExit), failed, or done: no
        # training may outlive the trial.
        ray.kill(runner, no_restart=True)


# --- the sweep's driver ---------------------------------------------------------------------------


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

    def row(self, keys: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"trial": self.trial_id, "outcome": self.outcome}
        out.update({k: self.params.get(k, "") for k in keys})
        out.update({
            "steps": "" if self.step is None else self.step,
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
    header = ["trial", "outcome", *keys, "steps", "loss", "probe_cer", "probe_wer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row[h]) for h in header) + " |")
    return "\n".join(lines)


def _rank_key(r: TrialRecord) -> tuple:
    scored = not math.isnan(r.probe_cer)
    return (not scored, -(r.step or 0), r.probe_cer if scored else 0.0, r.trial_id)


def sort_records(records: list[TrialRecord]) -> list[TrialRecord]:
    """Best first: the furthest-trained trials by probe score, then the ones stopped earlier."""
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


def _open_parent_run(spec: SweepSpec, cfg: Config) -> Any:
    from pipeline.tracking import Tracker

    tracker = Tracker.open(cfg, f"sweep-{spec.settings.name}")
    client = tracker.client
    client.set_tag(tracker.run_id, SWEEP_TAG, spec.settings.name)
    client.set_tag(tracker.run_id, ROLE_TAG, "parent")
    existing = client.get_run(tracker.run_id).data.params
    params = {f"sweep.{k}": str(v) for k, v in dataclasses.asdict(spec.settings).items()}
    params.update({f"space.{d.key}": d.describe() for d in spec.space})
    params.update({"sweep.metric_mode": METRIC_MODE, "base.preset": cfg.preset,
                   "base.train.max_steps": str(cfg.train.max_steps),
                   "base.probe_cadence": str(probe_cadence(cfg))})
    from mlflow.entities import Param

    new = [Param(k, v[:6000]) for k, v in params.items() if k not in existing]
    if new:
        client.log_batch(tracker.run_id, params=new)
    with tempfile.TemporaryDirectory() as tmp:
        save_config(cfg, Path(tmp) / "base_config.yaml")
        from pipeline.tracking import redact

        path = Path(tmp) / "base_config.yaml"
        path.write_text(redact(path.read_text()))
        if spec.source and Path(spec.source).is_file():
            (Path(tmp) / "sweep.yaml").write_text(redact(Path(spec.source).read_text()))
        tracker.log_artifacts(tmp)
    return tracker


def search_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's ``param_space``: the dotted config paths with their distributions."""
    return {d.key: d.to_tune() for d in spec.space}


def make_scheduler(s: SweepSettings, cfg: Config) -> Any:
    """ASHA on the probe score at equal ``step`` (rungs from the grace period up to
    ``train.max_steps``), or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if s.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=TIME_ATTR, max_t=cfg.train.max_steps,
        grace_period=min(s.grace_period or probe_cadence(cfg), cfg.train.max_steps),
        reduction_factor=s.reduction_factor,
    )


def make_searcher(s: SweepSettings) -> tuple[Any, int | None]:
    """(search algorithm, ``max_concurrent_trials`` for ``TuneConfig``).

    Tune applies ``max_concurrent_trials`` only to a ``Searcher`` (Optuna, which it wraps
    in a ConcurrencyLimiter); the variant generator of grid and random search takes the
    limit itself and would ignore the TuneConfig setting.
    """
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if s.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=s.seed), s.max_concurrent_trials
    return BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent_trials), None


def _build_tuner(spec: SweepSpec, cfg: Config, parent_run_id: str, experiment_path: str) -> Any:
    """A new Tuner, or the restored one when the sweep's folder holds a Tune experiment."""
    from ray import tune

    from pipeline.data import storage
    from pipeline.train.trainer import storage_for

    s = spec.settings
    ctx = TrialContext(
        sweep=s.name, base=to_dict(cfg), parent_run_id=parent_run_id,
        trial_cpus=s.trial_cpus, trial_gpus=s.trial_gpus, poll_seconds=s.poll_seconds,
    )
    resources = {"CPU": s.trial_cpus}
    if s.trial_gpus:
        resources["GPU"] = s.trial_gpus
    trainable = tune.with_resources(tune.with_parameters(trial_main, ctx=ctx), resources)
    store = storage_for(cfg)
    fs, path = storage.resolve(experiment_path, store)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        print(f"[wavray] sweep {s.name!r}: resuming the sweep stored at {experiment_path}", flush=True)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=fs)

    scheduler = make_scheduler(s, cfg)
    search_alg, max_concurrent = make_searcher(s)
    parent_fs_path = storage.resolve(storage.join(cfg.checkpoint.storage_path, "sweeps"), store)[1]
    return tune.Tuner(
        trainable,
        param_space=search_space(spec),
        tune_config=tune.TuneConfig(
            metric=s.metric, mode=METRIC_MODE, search_alg=search_alg, scheduler=scheduler,
            num_samples=s.num_samples, max_concurrent_trials=max_concurrent, reuse_actors=False,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=s.name, storage_path=parent_fs_path, storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=s.max_failures, fail_fast=False),
            verbose=1,
        ),
    )


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
        records.append(TrialRecord(
            trial_id=trial_id, outcome=outcome, params=params,
            step=int(metrics[TIME_ATTR]) if TIME_ATTR in metrics else None,
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
    header = ["trial", "outcome", *keys, "steps", "loss", "probe_cer", "probe_wer", "run_id"]
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


def checkpoint_config(ckpt_uri: str, cfg: Config) -> Config:
    """The resolved config a checkpoint was trained with (its ``config.yaml``)."""
    from pipeline.data import storage
    from pipeline.train.checkpoint import CONFIG_FILE
    from pipeline.train.trainer import storage_for

    text = storage.read_bytes(storage.join(ckpt_uri, CONFIG_FILE), storage_for(cfg)).decode("utf-8")
    return from_dict(yaml.safe_load(text))


def register_best(best: TrialRecord, cfg: Config, *, sweep: str, model_name: str, tracking_uri: str,
                  experiment: str) -> str:
    """Log the best trial's probed checkpoint in Hugging Face format (``best_model/hf_model``)
    with its resolved ``best_model/config.yaml`` on the trial's run, and register it as a new
    version of ``model_name`` with the alias ``best``. Idempotent: a version of this sweep
    for the same checkpoint is reused (a restored sweep registers nothing new)."""
    from models.hf import save_hf_pretraining
    from pipeline.tracking import Tracker, redact

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
        trial_cfg = checkpoint_config(best.checkpoint_uri, cfg)
        prober = CheckpointProber(trial_cfg, "", None, None)
        model = prober.load_model(CheckpointRef(uri=best.checkpoint_uri, step=best.step or 0, metrics={}))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "best_model"
            save_hf_pretraining(model, trial_cfg.model, out / "hf_model")
            save_config(trial_cfg, out / "config.yaml")
            (out / "config.yaml").write_text(redact((out / "config.yaml").read_text()))
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


def run_sweep(spec: SweepSpec) -> SweepResult:
    """Run (or resume) the sweep of ``spec`` on the connected Ray cluster."""
    from pipeline.data import storage
    from pipeline.tracking import install_log_redaction
    from pipeline.train.trainer import storage_for

    install_log_redaction()
    s = spec.settings
    cfg = resolve_paths(spec.config)
    store = storage_for(cfg)
    storage.ensure_bucket(cfg.checkpoint.storage_path, store)
    if not storage.is_s3(cfg.checkpoint.storage_path):
        os.makedirs(cfg.checkpoint.storage_path, exist_ok=True)
    experiment_path = storage.join(cfg.checkpoint.storage_path, "sweeps", s.name)
    parent = _open_parent_run(spec, cfg)
    print(f"[wavray] sweep {s.name!r}: {s.searcher} search over {', '.join(spec.keys)}; ranked by {s.metric} "
          f"({s.scheduler}); MLflow parent run {parent.run_id} in {parent.uri}", flush=True)
    try:
        tuner = _build_tuner(spec, cfg, parent.run_id, experiment_path)
        result_grid = tuner.fit()
        unfinished = len(result_grid) - result_grid.num_terminated - result_grid.num_errors
        if unfinished:
            # Interrupted (Ctrl-C, the driver's job stopped): Tune saved its state; the same
            # command resumes. Nothing is summarised or registered from a partial sweep.
            parent.set_tag("wavray.sweep.interrupted", f"{unfinished} unfinished trial(s); rerun to resume")
            parent.end("KILLED")
            raise SweepInterrupted(
                f"sweep {s.name!r} was interrupted with {unfinished} unfinished trial(s); run the same command "
                f"again to resume it from {experiment_path}"
            )
        client = parent.client
        records = collect_records(result_grid, client, cfg, s.name, spec.keys)
        finish_child_runs(client, records)
        best = best_record(records)
        with tempfile.TemporaryDirectory() as tmp:
            write_summary(records, spec.keys, Path(tmp))
            parent.log_artifacts(tmp)
        counts = {o: sum(r.outcome == o for r in records) for o in ("completed", "early_stopped", "failed")}
        parent.log_metrics(0, {"num_trials": float(len(records)), **{f"num_{k}": float(v) for k, v in counts.items()}})
        version = None
        if best is not None:
            parent.log_metrics(0, {f"best_{s.metric}": float(getattr(best, s.metric))})
            parent.set_tag("wavray.sweep.best_trial", best.trial_id)
            parent.set_tag("wavray.sweep.best_run_id", best.run_id)
            version = register_best(best, cfg, sweep=s.name, model_name=s.model_name,
                                    tracking_uri=parent.uri, experiment=cfg.tracking.experiment)
            parent.set_tag("wavray.sweep.model", f"{s.model_name}/{version}")
    except SweepInterrupted:
        raise
    except BaseException:
        parent.end("FAILED")
        raise
    if best is None:
        parent.end("FAILED")
        raise RuntimeError(f"sweep {s.name!r}: no trial produced a probe score ({len(records)} trials, "
                           f"{counts['failed']} failed); see the trials' errors in {experiment_path}")
    parent.end("FINISHED")
    return SweepResult(
        name=s.name, keys=spec.keys, records=records, best=best, model_name=s.model_name,
        model_version=version, parent_run_id=parent.run_id, tracking_uri=parent.uri,
        experiment_path=experiment_path,
    )


def copy_spec(spec: SweepSpec, **settings: Any) -> SweepSpec:
    """``spec`` with some settings changed (tests, scripts)."""
    new = copy.deepcopy(spec)
    new.settings = dataclasses.replace(new.settings, **settings)
    return new
