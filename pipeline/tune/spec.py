"""The sweep file: its schema (settings, search space), loading, and every check that
runs before any trial starts."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config import (
    Config,
    ConfigError,
    apply_overrides,
    load_config,
    parse_override,
    preset_config,
)

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "integer")
TOP_LEVEL_KEYS = ("base", "preset", "config", "sweep", "space")
FIXED_PREFIXES = ("probe.", "checkpoint.", "tracking.", "preset")
"""Paths a search space must not vary: the probe is the yardstick every trial is measured
with; run identity and tracking belong to the sweep."""
MAX_GRID_CHECK = 512


class SweepError(ConfigError):
    """A sweep file, setting or search space that cannot be used; raised before any trial."""


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
    if s.scheduler == "asha" and cfg.train.max_seconds > 0:
        raise SweepError(
            f"train.max_seconds = {cfg.train.max_seconds:g}: every trial gets the same time budget and is ranked "
            "at its end, while ASHA stops trials at equal updates; use sweep.scheduler=fifo"
        )
    if s.scheduler == "asha" and s.grace_period > cfg.train.max_steps:
        raise SweepError(
            f"sweep.grace_period: expected at most train.max_steps ({cfg.train.max_steps}), got {s.grace_period}"
        )
