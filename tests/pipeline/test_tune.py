"""The sweep file, its search space, and the sweep's MLflow side (summary, plots, registry).

No Ray here. The MLflow side (marked e2e: it starts services) runs against the real
default store (sqlite) and a real ``mlflow server`` started with ``infra/mlflow_server.sh``,
on checkpoints of a real tiny model written in the training checkpoint layout. The
end-to-end sweep is in ``tests/jobs/test_sweep.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from models.checkpoint import load_weights, save_weights
from models.factory import build_pretraining_model
from pipeline.config import ConfigError, apply_overrides, load_config, save_config
from pipeline.net import free_port
from pipeline.train.checkpoint import CONFIG_FILE, STATE_FILE, TrainerState
from pipeline.tune import (
    BEST_ALIAS,
    OUTCOME_TAG,
    PARENT_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    Dimension,
    SweepError,
    TrialRecord,
    best_record,
    finish_child_runs,
    format_table,
    load_sweep,
    make_searcher,
    register_best,
    resolve_paths,
    search_space,
    trial_config,
    validate_space,
    write_summary,
)

ROOT = Path(__file__).resolve().parents[2]
SWEEP_DIR = ROOT / "jobs" / "configs" / "sweep"
SHIPPED = sorted(SWEEP_DIR.glob("*.yaml"))


# --- the sweep files -----------------------------------------------------------------------------


def test_the_infra_sweep_and_the_demo_are_shipped() -> None:
    names = {p.name for p in SHIPPED}
    assert {"masking.yaml", "tiny_demo.yaml"} <= names, names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_dotted_path_of_every_shipped_sweep_resolves(path: Path) -> None:
    spec = load_sweep(path)
    raw = yaml.safe_load(path.read_text())
    assert spec.keys == list(raw["space"]), "every key of the file's space is searched"
    for dim in spec.space:
        for value in dim.candidates():
            cfg = apply_overrides(spec.config, {dim.key: value})
            section = cfg
            for part in dim.key.split("."):
                section = getattr(section, part)
            assert section == value, f"{dim.key} = {value!r} did not reach the config"
    # The base's deltas reached the base config too.
    for key, value in (raw.get("config") or {}).items():
        node = spec.config
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, key


def test_masking_sweep_is_a_pretext_task_search_on_the_probe() -> None:
    spec = load_sweep(SWEEP_DIR / "masking.yaml")
    assert spec.settings.searcher == "optuna" and spec.settings.scheduler == "asha"
    assert spec.settings.metric == "probe_cer"
    assert {"model.mask.prob", "model.mask.length", "model.quantizer.groups", "model.quantizer.entries"} <= set(
        spec.keys
    )
    assert spec.config.preset == "base" and spec.config.probe.train_uri


def test_unknown_key_names_it_and_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(SweepError) as e:
        load_sweep(SWEEP_DIR / "tiny_demo.yaml", ["space.model.mask.probability={grid: [0.5]}"])
    text = str(e.value)
    assert "model.mask.probability" in text and "prob" in text and "length" in text


def test_values_and_combinations_are_checked_before_any_trial() -> None:
    spec = load_sweep(SWEEP_DIR / "tiny_demo.yaml")
    cfg = spec.config
    with pytest.raises(SweepError, match="model.mask.prob"):  # a probability above 1
        validate_space(cfg, [Dimension.parse("model.mask.prob", {"grid": [0.5, 1.5]})])
    with pytest.raises(SweepError, match="expected an integer"):
        validate_space(cfg, [Dimension.parse("model.quantizer.entries", {"grid": [16, 32.5]})])
    with pytest.raises(SweepError, match="divisible"):  # groups must divide the codevector width
        validate_space(cfg, [Dimension.parse("model.quantizer.groups", {"grid": [1, 3]})])
    with pytest.raises(SweepError, match="the probe is the yardstick"):
        validate_space(cfg, [Dimension.parse("probe.steps", {"grid": [10, 20]})])
    with pytest.raises(SweepError, match="needs every key as"):
        validate_space(cfg, [Dimension.parse("model.mask.prob", {"uniform": [0.2, 0.8]})], "grid")
    with pytest.raises(SweepError, match="samples its trials"):
        validate_space(cfg, [Dimension.parse("model.mask.prob", {"grid": [0.2, 0.8]})], "optuna")
    with pytest.raises(SweepError, match="expected low < high"):
        Dimension.parse("model.mask.prob", {"uniform": [0.8, 0.2]})
    with pytest.raises(SweepError, match="one of grid, choice"):
        Dimension.parse("model.mask.prob", {"normal": [0.5, 0.1]})
    with pytest.raises(SweepError, match="one distribution"):
        Dimension.parse("model.mask.prob", [0.3, 0.5])


def test_settings_and_base_are_checked(tmp_path: Path) -> None:
    demo = SWEEP_DIR / "tiny_demo.yaml"
    with pytest.raises(SweepError, match="unknown sweep setting 'sweep.num_trials'"):
        load_sweep(demo, ["sweep.num_trials=3"])
    with pytest.raises(SweepError, match="sweep.max_concurrent_trials: expected >= 1"):
        load_sweep(demo, ["sweep.max_concurrent_trials=0"])
    with pytest.raises(SweepError, match="sweep.trial_cpus: expected > 0"):
        load_sweep(demo, ["sweep.trial_cpus=0"])
    with pytest.raises(SweepError, match="probe.train_uri"):
        load_sweep(demo, ["probe.train_uri="])
    with pytest.raises(SweepError, match="held out"):
        load_sweep(demo, ["probe.dev_split=train"])
    with pytest.raises(SweepError, match="multiple of checkpoint.every_steps"):
        load_sweep(demo, ["probe.every_steps=30"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny\nspaces: {}\n")
    with pytest.raises(SweepError, match="unknown top-level key"):
        load_sweep(bad)


def test_command_line_overrides_reach_settings_space_and_base() -> None:
    spec = load_sweep(SWEEP_DIR / "tiny_demo.yaml", [
        "sweep.searcher=random", "sweep.num_samples=3", "sweep.name=other",
        "space.model.mask.prob={uniform: [0.2, 0.7]}", "space.model.quantizer.entries={choice: [16, 32]}",
        "train.max_steps=80",
    ])
    assert (spec.settings.searcher, spec.settings.num_samples, spec.settings.name) == ("random", 3, "other")
    assert spec.space[0] == Dimension("model.mask.prob", "uniform", (0.2, 0.7))
    assert spec.config.train.max_steps == 80
    assert spec.settings.model_name == "wavray-tiny-demo"  # register_as from the file


def test_integer_ranges_include_both_ends() -> None:
    from ray.tune.search.sample import Integer

    dim = Dimension.parse("model.mask.length", {"integer": [5, 15]})
    domain = dim.to_tune()
    assert isinstance(domain, Integer) and (domain.lower, domain.upper) == (5, 16)
    assert dim.candidates() == [5, 15]


def test_trial_config_has_its_own_run_and_no_registration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_sweep(SWEEP_DIR / "tiny_demo.yaml", [
        f"checkpoint.storage_path={tmp_path / 'runs'}", "tracking.register_as=someone-elses-model",
    ])
    monkeypatch.chdir(tmp_path)  # relative paths resolve against it; the next test gets its own directory back
    cfg = resolve_paths(spec.config)
    assert Path(cfg.data.train_uri).is_absolute() and Path(cfg.probe.train_uri).is_absolute()
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    trial = trial_config(cfg, {"model.mask.prob": 0.3, "model.quantizer.entries": 64}, sweep="s", trial_id="ab_00001")
    assert trial.checkpoint.run_name == "s-ab_00001"
    assert trial.tracking.register_as == ""
    assert (trial.model.mask.prob, trial.model.quantizer.entries) == (0.3, 64)
    with pytest.raises(ConfigError):
        trial_config(cfg, {"model.mask.nope": 1}, sweep="s", trial_id="x")


# --- summary, plots and the registry on real MLflow stores -------------------------------------


def _fake_trained_checkpoint(root: Path, cfg, step: int, seed: int) -> str:
    """A checkpoint directory in the training layout holding a real tiny model."""
    d = root / f"checkpoint_{step:09d}"
    torch.manual_seed(seed)
    model = build_pretraining_model(cfg.model)
    save_weights(model, d)
    save_config(cfg, d / CONFIG_FILE)
    (d / STATE_FILE).write_text(TrainerState(step=step, skipped_steps=0, world_size=1, zero_stage=0,
                                             tag=f"step_{step:09d}", metrics={"loss": 3.0}).to_json())
    return str(d)


def _trial_runs(tracker_cfg, sweep: str, parent_id: str, records: list[TrialRecord]) -> None:
    from pipeline.tracking import Tracker

    for r in records:
        t = Tracker.open(tracker_cfg, f"{sweep}-{r.trial_id}")
        t.client.set_tag(t.run_id, PARENT_TAG, parent_id)
        t.client.set_tag(t.run_id, SWEEP_TAG, sweep)
        t.client.set_tag(t.run_id, TRIAL_TAG, r.trial_id)
        for step, cer in r.curve:
            t.log_metrics(step, {"probe/cer": cer})
        r.run_id = t.run_id


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """``infra/mlflow_server.sh`` on a free loopback port with its own store; stopped after."""
    d = tmp_path_factory.mktemp("mlflow-server")
    env = {**os.environ, "WAVRAY_MLFLOW_DIR": str(d / "state")}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    script = ROOT / "infra" / "mlflow_server.sh"
    try:
        started = subprocess.run(
            ["bash", str(script), "start", "--port", str(port), "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
             "--artifacts-destination", str(d / "art")], env=env, timeout=180, check=False,
        )
        if started.returncode != 0:  # the script waits 60 s; a loaded machine may need longer
            _wait_for_health(url, 180)
        yield url
    finally:
        subprocess.run(["bash", str(script), "stop"], env=env, timeout=60, check=False)


def _wait_for_health(url: str, seconds: float) -> None:
    import time
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with opener.open(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"mlflow server at {url} did not answer within {seconds} s")


@pytest.mark.e2e
@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_summary_plots_and_registration_of_the_best_trial(store: str, tmp_path: Path, request) -> None:
    from mlflow.tracking import MlflowClient
    from transformers import Wav2Vec2Model

    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if store == "sqlite" else request.getfixturevalue("mlflow_server")
    experiment = f"sweep-test-{store}"
    base = load_config(preset="tiny", overrides=[f"checkpoint.storage_path={tmp_path}", f"tracking.uri={uri}",
                                                 f"tracking.experiment={experiment}"])
    sweep = "unit"
    keys = ["model.mask.prob", "model.quantizer.entries"]
    records = []
    for i, (prob, entries, cer, outcome) in enumerate([
        (0.3, 16, 0.71, "completed"), (0.65, 16, 0.64, "completed"), (0.3, 64, 0.50, "early_stopped"),
        (0.65, 64, math.nan, "failed"),
    ]):
        cfg = apply_overrides(base, {"model.mask.prob": prob, "model.quantizer.entries": entries})
        ckpt = _fake_trained_checkpoint(tmp_path / f"trial{i}", cfg, 40, seed=i) if outcome != "failed" else ""
        curve = [] if outcome == "failed" else [(20, cer + 0.1), (40, cer)][: 1 if outcome == "early_stopped" else 2]
        records.append(TrialRecord(
            trial_id=f"t_{i:05d}", outcome=outcome, params={"model.mask.prob": prob, "model.quantizer.entries": entries},
            step=None if outcome == "failed" else curve[-1][0], loss=3.0 + i, probe_cer=cer,
            probe_wer=1.0, checkpoint_uri=ckpt, error="RuntimeError: boom" if outcome == "failed" else "",
            curve=curve,
        ))
    parent = Tracker.open(base, f"sweep-{sweep}")
    _trial_runs(base, sweep, parent.run_id, records)

    best = best_record(records)
    # Lowest CER among the trials that reached the most updates: the early-stopped trial's
    # lower CER after 20 updates does not count against finished trials; the failed one is out.
    assert best is not None and best.trial_id == "t_00001"
    table = format_table(records, keys)
    order = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert order == ["t_00001", "t_00000", "t_00002", "t_00003"], table

    finish_child_runs(parent.client, records)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    statuses = {r.trial_id: client.get_run(r.run_id).info.status for r in records}
    assert statuses == {"t_00000": "FINISHED", "t_00001": "FINISHED", "t_00002": "KILLED", "t_00003": "FAILED"}
    assert client.get_run(records[2].run_id).data.tags[OUTCOME_TAG] == "early_stopped"

    files = write_summary(records, keys, tmp_path / "summary")
    assert {f.name for f in files} == {"summary.csv", "summary.md", "probe_cer_vs_params.png", "probe_cer_curves.png"}
    assert all(f.stat().st_size > 0 for f in files)
    assert (tmp_path / "summary" / "probe_cer_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    parent.log_artifacts(tmp_path / "summary")
    assert {a.path for a in client.list_artifacts(parent.run_id)} >= {"summary.csv", "probe_cer_vs_params.png"}

    name = f"wavray-unit-{store}"
    version = register_best(best, base, sweep=sweep, model_name=name, tracking_uri=uri, experiment=experiment)
    mv = client.get_model_version_by_alias(name, BEST_ALIAS)
    assert str(mv.version) == version and mv.run_id == best.run_id
    assert mv.tags[TRIAL_TAG] == best.trial_id and float(mv.tags["probe_cer"]) == pytest.approx(0.64)
    local = Path(client.download_artifacts(best.run_id, "best_model", str(tmp_path / "dl")))
    hf = Wav2Vec2Model.from_pretrained(local / "hf_model")
    assert hf.config.num_hidden_layers == base.model.transformer.num_layers
    resolved = load_config(local / "config.yaml")
    assert resolved.model.mask.prob == 0.65 and resolved.model.quantizer.entries == 16
    # The registered weights are the best trial's checkpoint (each trial's model has its own seed).
    ours = load_weights(best.checkpoint_uri)["encoder.feature_projection.linear.weight"]
    assert torch.equal(ours, hf.feature_projection.projection.weight.detach())
    other = load_weights(records[0].checkpoint_uri)["encoder.feature_projection.linear.weight"]
    assert not torch.equal(other, hf.feature_projection.projection.weight.detach())
    # Registering again (a restored sweep) reuses the version.
    assert register_best(best, base, sweep=sweep, model_name=name, tracking_uri=uri, experiment=experiment) == version
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


@pytest.mark.parametrize("searcher", ["random", "optuna"])
def test_samplers_propose_trials_inside_the_space(searcher: str) -> None:
    spec = load_sweep(SWEEP_DIR / "masking.yaml", [f"sweep.searcher={searcher}"])
    alg, limit = make_searcher(spec.settings)
    space = search_space(spec)
    if searcher == "optuna":
        assert limit == spec.settings.max_concurrent_trials  # Tune limits a Searcher's concurrency
        assert alg.set_search_properties("probe_cer", "min", space)
        proposals = [alg.suggest(f"trial{i}") for i in range(6)]
    else:
        assert limit is None  # the variant generator holds the limit itself
        proposals = [{key: domain.sample() for key, domain in space.items()} for _ in range(6)]
    dims = {d.key: d for d in spec.space}
    for params in proposals:
        assert set(params) == set(dims), params  # flat dotted keys, as the overrides take them
        for key, value in params.items():
            d = dims[key]
            if d.kind == "choice":
                assert value in d.values
            else:
                assert d.values[0] <= value <= d.values[1], (key, value)
        cfg = trial_config(spec.config, params, sweep="s", trial_id="t")
        assert cfg.model.mask.length == params["model.mask.length"]
    assert len({json.dumps(p, sort_keys=True) for p in proposals}) > 1


def test_a_sweep_over_labelling_settings_lists_each_label_set_once() -> None:
    """HuBERT's K and feature layer are searched like any path; the sweep's driver makes each
    distinct label set once before the trials (pipeline.tune.labels)."""
    from pipeline.tune.labels import label_configs

    spec = load_sweep(SWEEP_DIR / "hubert_demo.yaml")
    assert [c.model.hubert.clusters for c in label_configs(spec)] == [50, 100, 200]
    assert {c.label.set_name(c.model.hubert.clusters) for c in label_configs(spec)} == {
        "mfcc-k50", "mfcc-k100", "mfcc-k200"}
    layers = load_sweep(SWEEP_DIR / "hubert_demo.yaml", [
        "label.features=model", "label.teacher=runs/it1", "space.label.layer={grid: [1, 2]}",
        "space.model.mask.prob={grid: [0.5, 0.8]}"])
    made = label_configs(layers)
    assert len(made) == 6, "the mask probability does not make another label set"
    assert {c.label.set_name(c.model.hubert.clusters) for c in made} == {
        f"layer{layer}-k{k}" for layer in (1, 2) for k in (50, 100, 200)}
    # A sweep of other objectives labels nothing.
    assert label_configs(load_sweep(SWEEP_DIR / "tiny_demo.yaml")) == []


def test_w2v_bert_is_a_value_of_the_objective_dimension() -> None:
    """On the objectives demo's Conformer, w2v-BERT is one more grid value (its split: a third
    of the blocks, here 1 + 1); on a Transformer base it is refused before any trial starts."""
    spec = load_sweep(SWEEP_DIR / "objectives_demo.yaml",
                      ["space.model.objective={grid: [wav2vec2, best_rq, w2v_bert]}"])
    cfg = apply_overrides(spec.config, {"model.objective": "w2v_bert"})
    assert cfg.model.transformer.num_layers == 2 and cfg.model.w2v_bert_contrastive_layers == 1
    with pytest.raises(SweepError, match="conformer"):
        load_sweep(SWEEP_DIR / "tiny_demo.yaml", ["space.model.objective={grid: [wav2vec2, w2v_bert]}"])
