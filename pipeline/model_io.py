"""Reading a trained model from wherever it lives: the one loader every job uses.

A model location (``jobs.export --checkpoint`` / ``--from-hf``, ``jobs.evaluate
--checkpoint``, ``train.init_from`` of pretraining and fine-tuning, a sweep's trials and
its best model) is any of:

- a wavray model checkpoint: ``config.yaml`` + ``model.safetensors`` (every training
  checkpoint is one), or its ``model.safetensors`` itself;
- a wavray run folder: its newest complete checkpoint;
- a Hugging Face directory: ``config.json`` + weights (+ ``vocab.json`` for CTC);
- an MLflow model bundle: ``hf_model/`` (+ the run's ``config.yaml``), what a sweep registers;

each as a local path or an ``s3://`` URI, or an MLflow URI: ``models:/<name>@<alias>``,
``models:/<name>/<version>`` or ``runs:/<run id>/<path>``, read from the tracking store
(``tracking.uri``, else the default store of the run's config, else
``MLFLOW_TRACKING_URI``).

From object storage only the files a model needs are copied (not the optimizer states of
a training checkpoint), into a fresh local directory. An alias is resolved once, by the
driver (:func:`pin`), so every worker of a run loads the same version.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from torch import nn

from models.checkpoint import WEIGHTS_NAME, load_into, read_state_dict
from models.hf import HF_CONFIG, PREPROCESSOR_CONFIG, hf_to_model_config, load_hf, read_hf_config
from pipeline.config import CONFIG_FILE, Config, from_dict
from pipeline.data import storage
from pipeline.text import VOCAB_FILE, Vocabulary
from pipeline.tracking import HF_MODEL_ARTIFACT

MLFLOW_SCHEMES = ("models:/", "runs:/")
BUNDLE_DIR = HF_MODEL_ARTIFACT
"""The Hugging Face directory inside a logged or registered model bundle."""


def write_bundle(model: nn.Module, cfg: Config, out_dir: str | Path) -> Path:
    """A trained pretraining model for others, in ``out_dir``: ``config.yaml`` +
    ``model.safetensors`` (exact; what :func:`load_model` reads first) and ``hf_model/``
    where Hugging Face has a class for it: ``Wav2Vec2(Conformer)ForPreTraining`` for wav2vec
    2.0, the encoder alone (``Wav2Vec2(Conformer)Model``, ``HubertModel`` / ``WavLMModel``,
    ``Data2VecAudioModel`` for data2vec 1.0) for another objective, nothing for an encoder it
    has no class for (a log-mel front end: Hugging Face's models read the waveform through
    convolutions; wav2vec 1.0's front end, a causal conv or GRU context network, absolute
    positions, data2vec 2.0's ALiBi: :func:`models.hf.hf_unsupported`)."""
    from models.checkpoint import save_weights
    from models.hf import hf_unsupported, save_hf_encoder, save_hf_pretraining
    from pipeline.config import save_config

    out = Path(out_dir)
    save_weights(model, out)
    save_config(cfg, out / CONFIG_FILE)
    if not hf_unsupported(cfg.model):
        if cfg.model.objective == "wav2vec2":
            save_hf_pretraining(model, cfg.model, out / BUNDLE_DIR, normalize=cfg.data.normalize)
        else:
            encoder = {k[len("encoder."):]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
            save_hf_encoder(encoder, cfg.model, out / BUNDLE_DIR, normalize=cfg.data.normalize)
    return out

Task = Literal["pretraining", "ctc", "any"]
Kind = Literal["wavray", "hf", "bundle", "run"]


def is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(MLFLOW_SCHEMES)


def _tracking_uri(tracking_uri: str) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise ValueError("an MLflow model URI needs a tracking store: set tracking.uri (or MLFLOW_TRACKING_URI)")
    return uri


def _model_version(uri: str, tracking_uri: str) -> Any:
    """The registered model version a ``models:/`` URI names."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    rest = uri[len("models:/"):]
    store = _tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = rest.partition("/")
        if not version.isdigit():
            raise ValueError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
        return client.get_model_version(name, version)
    except MlflowException as e:
        raise ValueError(f"{uri!r}: not found in the MLflow store {store}: {e.message}") from None


def pin(uri: str, *, tracking_uri: str = "") -> str:
    """The form of a location to record in a run's config: an alias becomes its version
    (``models:/m@best`` -> ``models:/m/3``) and a local path becomes absolute (a job's
    workers may run elsewhere on the machine); anything else as given."""
    if not uri:
        return uri
    if uri.startswith("models:/") and "@" in uri:
        mv = _model_version(uri, tracking_uri)
        return f"models:/{mv.name}/{mv.version}"
    if "://" in uri or is_mlflow_uri(uri):
        return uri
    return str(Path(uri).expanduser().resolve())


def _download_mlflow(uri: str, tracking_uri: str) -> Path:
    import mlflow.artifacts

    store = _tracking_uri(tracking_uri)
    if uri.startswith("models:/"):
        source = _model_version(uri, tracking_uri).source
    else:
        source = uri
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=store))
    except Exception as e:  # MLflow raises its own types for missing runs and artifacts
        raise ValueError(f"{uri!r}: cannot read it from the MLflow store {store}: {e}") from None


def _names(uri: str, store: storage.Storage | None) -> dict[str, bool]:
    """Direct children of ``uri``: name -> is a directory."""
    import pyarrow.fs as pafs

    return {i.base_name: i.type == pafs.FileType.Directory for i in storage.list_dir(uri, store)}


def _has_checkpoints(names: dict[str, bool]) -> bool:
    from pipeline.train.checkpoint import CHECKPOINT_DIR_RE

    return any(is_dir and CHECKPOINT_DIR_RE.match(n) for n, is_dir in names.items())


def kind_of(names: dict[str, bool], where: str) -> Kind:
    """What a model directory holds, from its children (name -> is a directory)."""
    if HF_CONFIG in names:
        return "hf"
    if CONFIG_FILE in names and WEIGHTS_NAME in names:
        return "wavray"
    if names.get(BUNDLE_DIR):
        return "bundle"
    if _has_checkpoints(names):
        return "run"
    if WEIGHTS_NAME in names:
        raise ValueError(f"checkpoint {where!r}: no {CONFIG_FILE} next to {WEIGHTS_NAME}")
    raise ValueError(
        f"{where!r} holds no model: expected {CONFIG_FILE} + {WEIGHTS_NAME} (a wavray checkpoint), "
        f"checkpoint_* folders (a wavray run), {HF_CONFIG} (a Hugging Face directory) or {BUNDLE_DIR}/ "
        f"(an MLflow model); found {sorted(names)[:10]}"
    )


def _newest_checkpoint(run_uri: str, store: storage.Storage | None) -> str:
    from pipeline.train.trainer import latest_checkpoint_uri

    latest = latest_checkpoint_uri(run_uri, store)
    if latest is None:
        raise ValueError(f"run folder {run_uri!r}: no complete checkpoint yet")
    return latest


def _copy_files(uri: str, dest: Path, store: storage.Storage | None) -> None:
    """The files directly under ``uri`` (not its folders: a training checkpoint's
    optimizer states stay where they are) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, is_dir in _names(uri, store).items():
        if not is_dir:
            (dest / name).write_bytes(storage.read_bytes(storage.join(uri, name), store))


def fetch(uri: str, *, store: storage.Storage | None = None, tracking_uri: str = "") -> Path:
    """A local directory (or weights file) with the model at ``uri``; a run folder gives
    its newest complete checkpoint."""
    if not uri:
        raise ValueError("model location: expected a path, an s3:// URI or an MLflow model URI, got ''")
    if is_mlflow_uri(uri):
        return fetch(str(_download_mlflow(uri, tracking_uri)), store=store)
    if storage.is_s3(uri):
        names = _names(uri, store)
        if not names:
            raise ValueError(f"{uri!r} does not exist (or is empty) in the object store")
        kind = kind_of(names, uri)
        if kind == "run":
            return fetch(_newest_checkpoint(uri, store), store=store)
        local = Path(tempfile.mkdtemp(prefix="wavray-model-"))
        _copy_files(uri, local, store)
        if kind == "bundle":
            _copy_files(storage.join(uri, BUNDLE_DIR), local / BUNDLE_DIR, store)
        return local
    if "://" in uri:
        raise ValueError(f"{uri!r}: expected a local path, an s3:// URI or an MLflow model URI")
    p = Path(uri).expanduser()
    if not p.exists():
        raise ValueError(f"{uri!r} does not exist")
    if p.is_file():
        if p.name != WEIGHTS_NAME and p.suffix != ".safetensors":
            raise ValueError(f"{uri!r}: expected a model directory or its {WEIGHTS_NAME}")
        return p
    names = {c.name: c.is_dir() for c in p.iterdir()}
    if HF_CONFIG not in names and CONFIG_FILE not in names and not names.get(BUNDLE_DIR) and _has_checkpoints(names):
        return Path(_newest_checkpoint(str(p), store))
    return p  # what it holds is for the reader to say


def _local_kind(path: Path) -> Kind:
    if path.is_file():
        if not (path.parent / CONFIG_FILE).is_file():
            raise ValueError(f"checkpoint {str(path)!r}: no {CONFIG_FILE} next to {path.name}")
        return "wavray"
    return kind_of({c.name: c.is_dir() for c in path.iterdir()}, str(path))


def _read_config(path: Path) -> Config:
    cfg_file = (path.parent if path.is_file() else path) / CONFIG_FILE
    try:
        data = yaml.safe_load(cfg_file.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{cfg_file}: not valid YAML: {e}") from None
    with warnings.catch_warnings():  # configs saved before a key moved load with its new name
        warnings.simplefilter("ignore")
        return from_dict(data)


def run_config(uri: str, *, store: storage.Storage | None = None, tracking_uri: str = "") -> Config | None:
    """The resolved run config saved with the model at ``uri`` (None for a Hugging Face
    directory, which has none)."""
    path = fetch(uri, store=store, tracking_uri=tracking_uri)
    kind = _local_kind(path)
    if kind == "hf" or (kind == "bundle" and not (path / CONFIG_FILE).is_file()):
        return None
    return _read_config(path)


def architecture(cfg: Config, task: Literal["pretraining", "ctc"], vocab_size: int | None = None) -> nn.Module:
    """A fresh model of a run config: the pretraining model, or the CTC model with a
    ``vocab_size``-way head on the encoder ``finetune.frontend`` names."""
    from models.factory import build_ctc_model, build_pretraining_model

    if task == "pretraining":
        return build_pretraining_model(cfg.model)
    if vocab_size is None:
        vocab_size = len(Vocabulary.from_characters(cfg.finetune.vocab))
    if cfg.finetune.frontend == "logmel":
        from pipeline.features import build_logmel_ctc_model

        return build_logmel_ctc_model(cfg.model, vocab_size, cfg.finetune.n_mels)
    return build_ctc_model(cfg.model, vocab_size)


@dataclass
class TrainedModel:
    """A model read from a location, in eval mode, with what it needs to be used."""

    model: nn.Module
    config: Config | None
    """The run config it was trained with; None for a Hugging Face directory."""
    vocab: Vocabulary | None
    """The CTC vocabulary (CTC models whose vocabulary fits their head)."""
    normalize: bool
    """Whether its input is normalised per utterance (``data.normalize`` of its run)."""
    path: Path
    """Where it was read from, locally."""
    vocab_problem: str = ""
    """Why a CTC model has no usable vocabulary (a head of another size)."""

    @property
    def task(self) -> str:
        """``ctc`` for a CTC model, ``pretraining`` otherwise (JUST's model, with its CTC head,
        included: ``load_model(task="ctc")`` reads a JUST checkpoint as its CTC model)."""
        return "ctc" if hasattr(self.model, "head") and not hasattr(self.model, "quantizer") else "pretraining"

    def require_vocab(self) -> Vocabulary:
        """The vocabulary that decodes the CTC head's outputs; an error saying why there is none."""
        if self.vocab is None:
            raise ValueError(self.vocab_problem or f"{self.path}: not a CTC model; it has no vocabulary")
        return self.vocab


def _hf_normalize(path: Path) -> bool:
    import json

    pre = path / PREPROCESSOR_CONFIG
    if pre.is_file():
        try:
            return bool(json.loads(pre.read_text()).get("do_normalize", False))
        except json.JSONDecodeError:
            return False
    return False


def _task_of_hf(path: Path) -> str:
    arch = read_hf_config(path).get("architectures") or []
    return "ctc" if any(str(a).endswith("ForCTC") for a in arch) else "pretraining"


def load_model(
    uri: str, *, task: Task = "any", store: storage.Storage | None = None, tracking_uri: str = ""
) -> TrainedModel:
    """The trained model at ``uri`` (any location of the module doc), in eval mode.

    ``task``: ``pretraining`` or ``ctc`` refuse the other kind with an error saying what
    was found; ``any`` takes what is there. A JUST checkpoint is both: its pretraining model
    (``any``, ``pretraining``), or with ``ctc`` the CTC model of its encoder and CTC head,
    which ``jobs.evaluate`` scores like a fine-tuned one. The weights must match the saved config
    exactly (every tensor, every shape).
    """
    path = fetch(uri, store=store, tracking_uri=tracking_uri)
    kind = _local_kind(path)
    hf_dir = path / BUNDLE_DIR if kind == "bundle" else path
    cfg = None if kind == "hf" or (kind == "bundle" and not (path / CONFIG_FILE).is_file()) else _read_config(path)

    if cfg is None:  # a Hugging Face directory: its config.json says everything
        found = _task_of_hf(hf_dir)
        _check_task(task, found, uri)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*freshly initialised.*|.*fine-tuning values.*")
            _, model = load_hf(hf_dir, task=found)
        vocab = _hf_vocab(hf_dir, model) if found == "ctc" else None
        return TrainedModel(model.eval(), None, vocab, _hf_normalize(hf_dir), path)

    if kind == "bundle":  # Hugging Face weights (the Gumbel temperature is in their config.json)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = load_hf(hf_dir, task=_task_of_hf(hf_dir))[1].state_dict()
    else:
        state = read_state_dict(path)
    found = "ctc" if "head.weight" in state else "pretraining"
    if cfg.model.objective == "just":
        # Both at once: a pretraining model whose encoder and CTC head are a CTC model's.
        found = "ctc" if task == "ctc" else "pretraining"
        if found == "ctc":
            state = ctc_state(cfg, state)
    _check_task(task, found, uri)
    vocab, problem, head_size = None, "", None
    if found == "ctc":
        head_size = int(state["head.weight"].shape[0])
        vocab = _hf_vocab(hf_dir, None) if (hf_dir / VOCAB_FILE).is_file() else Vocabulary.from_characters(
            cfg.finetune.vocab
        )
        if head_size != len(vocab):
            problem = f"{uri}: the head has {head_size} outputs, its vocabulary (finetune.vocab) {len(vocab)} tokens"
            vocab = None
    model = architecture(cfg, found, head_size)  # type: ignore[arg-type]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {uri!r}: weights do not match its {CONFIG_FILE}: {e}") from None
    return TrainedModel(model.eval(), cfg, vocab, cfg.data.normalize, path, problem)


def ctc_state(cfg: Config, state: Mapping[str, Any]) -> dict[str, Any]:
    """The CTC model's part of a run's full state dict: all of a fine-tuning run's; of a JUST
    run's, its encoder and CTC head (named as :class:`models.wav2vec2.Wav2Vec2ForCTC`'s)."""
    if cfg.model.objective == "just":
        return {k: v for k, v in state.items() if k.startswith(("encoder.", "head."))}
    return dict(state)


def _check_task(wanted: Task, found: str, uri: str) -> None:
    if wanted != "any" and wanted != found:
        what = "a fine-tuned (CTC) model" if found == "ctc" else "a pretraining model (no CTC head)"
        raise ValueError(f"{uri!r} holds {what}, not a {wanted} model")


def _hf_vocab(path: Path, model: nn.Module | None) -> Vocabulary:
    vocab = Vocabulary.load(path) if (path / VOCAB_FILE).is_file() else Vocabulary.from_characters()
    size = getattr(model, "vocab_size", None)
    if size is not None and len(vocab) != size:
        raise ValueError(f"{path}: {VOCAB_FILE} has {len(vocab)} tokens, the model's head {size}")
    return vocab


def source_model_config(uri: str, *, store: storage.Storage | None = None,
                        tracking_uri: str = "") -> tuple[Any, bool | None]:
    """(model section, ``data.normalize`` or None when unknown) of the model at ``uri``:
    what a run initialised from it must build."""
    path = fetch(uri, store=store, tracking_uri=tracking_uri)
    kind = _local_kind(path)
    if kind == "hf" or (kind == "bundle" and not (path / CONFIG_FILE).is_file()):
        hf_dir = path / BUNDLE_DIR if kind == "bundle" else path
        return hf_to_model_config(read_hf_config(hf_dir), for_pretraining=False), None
    cfg = _read_config(path)
    return cfg.model, cfg.data.normalize


def init_weights(model: nn.Module, uri: str, *, store: storage.Storage | None = None,
                 tracking_uri: str = "") -> list[str]:
    """Initialise ``model`` from the weights at ``uri`` (continued pretraining, fine-tuning):
    encoder weights must all be there; heads the source lacks keep their initialisation.
    Returns the names of the parameters left as they were."""
    path = fetch(uri, store=store, tracking_uri=tracking_uri)
    if _local_kind(path) == "bundle":
        path = path / BUNDLE_DIR
    return load_into(model, read_state_dict(path), uri)

