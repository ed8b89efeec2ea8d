"""Sweeps over HuBERT's labelling settings (``model.hubert.clusters``, ``label.layer``, any
``label.*``): every distinct label set the space names is made before the trials start.

A label set is a Ray Data job over the whole corpus, shared by every trial whose settings
name it: made once here, by the sweep's driver (trials with the same K and layer would
otherwise make it side by side), and looked up by each trial (:func:`pipeline.label.job.
ensure_labels`, a no-op when it is there). Label settings drawn from a range (``integer``)
cannot be listed in advance; their trials make their own sets.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

from pipeline.config import Config, apply_overrides, to_flat_dict
from pipeline.tune.spec import SweepSpec

LABEL_KEYS = ("label.", "model.hubert.clusters", "model.objective", "data.train_uri")
"""The config paths that decide a label set (or whether a trial needs one)."""


def label_configs(spec: SweepSpec, base: Config | None = None) -> list[Config]:
    """One config per distinct label set the listed values of the space name (HuBERT trials only)."""
    base = base or spec.config
    dims = [d for d in spec.space if d.key.startswith(LABEL_KEYS) and d.kind in ("grid", "choice")]
    out: list[Config] = []
    seen: set[str] = set()
    for combo in itertools.product(*(d.values for d in dims)):
        cfg = apply_overrides(base, dict(zip((d.key for d in dims), combo, strict=True)))
        if cfg.model.objective != "hubert":
            continue
        key = json.dumps({k: v for k, v in to_flat_dict(cfg).items() if k.startswith(LABEL_KEYS)}, sort_keys=True,
                         default=str)
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


def label_before_trials(spec: SweepSpec, base: Config, progress: Callable[[str], None] = print) -> int:
    """Make every label set the sweep's trials will train on; returns how many it names."""
    from pipeline.label.job import run_labelling

    configs = label_configs(spec, base)
    for i, cfg in enumerate(configs, 1):
        progress(f"[wavray] sweep {spec.settings.name!r}: label set {i}/{len(configs)}: "
                 f"{cfg.label.set_name(cfg.model.hubert.clusters)}")
        run_labelling(cfg, progress=progress)
    return len(configs)
