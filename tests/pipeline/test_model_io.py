"""Every location of a trained model reads the same way: local paths, s3:// URIs (the real
object store), MLflow model URIs (a real registry), checkpoints, run folders, Hugging
Face directories and registered bundles."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fixtures.objectstore import S3Store

from models.checkpoint import save_weights
from models.factory import build_ctc_model, build_pretraining_model
from models.hf import save_hf_pretraining
from pipeline import model_io
from pipeline.config import CONFIG_FILE, apply_overrides, laptop, save_config, tiny
from pipeline.data import storage
from pipeline.tracking import Tracker
from pipeline.train.checkpoint import STATE_FILE, TrainerState, checkpoint_dir_name

pytestmark = pytest.mark.e2e


def _checkpoint(d: Path, cfg, model, step: int) -> Path:
    save_weights(model, d)
    save_config(cfg, d / CONFIG_FILE)
    (d / "deepspeed").mkdir()
    (d / "deepspeed" / "optimizer_states.pt").write_bytes(b"x" * 1000)  # stays where it is
    (d / STATE_FILE).write_text(TrainerState(step=step, skipped_steps=0, world_size=1, zero_stage=0,
                                             tag=f"step_{step:09d}").to_json())
    return d


def _upload(local: Path, uri: str) -> None:
    storage.upload_file(local, uri)  # a directory, file by file, as every job uploads


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if k not in skip)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, s3_store: S3Store) -> dict:
    root = tmp_path_factory.mktemp("models")
    cfg = laptop()
    torch.manual_seed(1)
    pre = build_pretraining_model(cfg.model)
    pre.set_num_updates(77)
    run = root / "run"
    _checkpoint(run / checkpoint_dir_name(4), cfg, build_pretraining_model(cfg.model), 4)
    _checkpoint(run / checkpoint_dir_name(8), cfg, pre, 8)
    ctc_cfg = apply_overrides(tiny(), ["finetune.vocab=abc"])
    ctc = build_ctc_model(ctc_cfg.model, vocab_size=5)
    _checkpoint(root / "ctc", ctc_cfg, ctc, 3)
    save_hf_pretraining(pre, cfg.model, root / "hf", normalize=True)
    _upload(run, s3_store.uri("models/run"))
    _upload(root / "ctc", s3_store.uri("models/ctc"))
    _upload(root / "hf", s3_store.uri("models/hf"))

    # A registered model: an MLflow run's hf_model bundle with the run config beside it.
    db = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker.open(apply_overrides(cfg, [f"tracking.uri={db}"]), "registered")
    bundle = root / "bundle"
    save_hf_pretraining(pre, cfg.model, bundle / model_io.BUNDLE_DIR)
    save_config(cfg, bundle / CONFIG_FILE)
    tracker.log_artifacts(bundle, "best_model")
    version = tracker.register_model("wavray-io", artifact_path="best_model")
    tracker.client.set_registered_model_alias("wavray-io", "best", version)
    return {"root": root, "cfg": cfg, "pre": pre, "ctc": ctc, "db": db, "run_id": tracker.run_id,
            "version": version, "s3": s3_store.uri("models")}


def test_local_checkpoint_weights_file_and_run_folder(trained: dict) -> None:
    run = trained["root"] / "run"
    for location in (run / checkpoint_dir_name(8), run / checkpoint_dir_name(8) / "model.safetensors", run):
        got = model_io.load_model(str(location), task="pretraining")
        assert got.config == trained["cfg"] and got.normalize and got.task == "pretraining"
        assert _same_weights(got.model, trained["pre"]), location  # the run folder gives its newest
        assert float(got.model.quantizer.temperature) == float(trained["pre"].quantizer.temperature)


def test_s3_checkpoint_and_run_folder_copy_only_the_model(trained: dict) -> None:
    s3 = trained["s3"]
    for location in (f"{s3}/run/{checkpoint_dir_name(8)}", f"{s3}/run"):
        got = model_io.load_model(location, task="pretraining")
        assert _same_weights(got.model, trained["pre"]), location
        assert not (got.path / "deepspeed").exists(), "optimizer states are not the model"
    ctc = model_io.load_model(f"{s3}/ctc", task="ctc")
    assert _same_weights(ctc.model, trained["ctc"]) and ctc.require_vocab().characters == "abc"
    with pytest.raises(ValueError, match="holds a fine-tuned"):
        model_io.load_model(f"{s3}/ctc", task="pretraining")


def test_hugging_face_directories_local_and_s3(trained: dict) -> None:
    for location in (str(trained["root"] / "hf"), f"{trained['s3']}/hf"):
        got = model_io.load_model(location)
        assert got.config is None and got.normalize  # preprocessor_config.json says so
        assert _same_weights(got.model, trained["pre"], skip=("quantizer.temperature",))


def test_mlflow_model_uris_by_alias_version_and_run(trained: dict) -> None:
    db, version = trained["db"], trained["version"]
    pinned = model_io.pin("models:/wavray-io@best", tracking_uri=db)
    assert pinned == f"models:/wavray-io/{version}"
    for location in ("models:/wavray-io@best", pinned, f"runs:/{trained['run_id']}/best_model"):
        got = model_io.load_model(location, tracking_uri=db)
        assert got.config == trained["cfg"], location  # the bundle's run config
        assert _same_weights(got.model, trained["pre"]), location
    cfg, normalize = model_io.source_model_config("models:/wavray-io@best", tracking_uri=db)
    assert cfg == trained["cfg"].model and normalize is True


def test_unusable_locations_say_what_is_wrong(trained: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        model_io.load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="does not exist"):
        model_io.load_model(f"{trained['s3']}/nothing-here")
    with pytest.raises(ValueError, match="not found in the MLflow store"):
        model_io.load_model("models:/no-such-model@best", tracking_uri=trained["db"])
    with pytest.raises(ValueError, match="needs a tracking store"):
        model_io.fetch("models:/wavray-io@best")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no model"):
        model_io.load_model(str(tmp_path / "empty"))
    shutil.copytree(trained["root"] / "run" / checkpoint_dir_name(8), tmp_path / "no_config")
    (tmp_path / "no_config" / CONFIG_FILE).unlink()
    with pytest.raises(ValueError, match=f"no {CONFIG_FILE}"):
        model_io.load_model(str(tmp_path / "no_config"))
