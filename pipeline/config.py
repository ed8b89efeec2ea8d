"""The typed config tree of a wavray run, YAML loading and ``a.b.c=value`` overrides.

One mechanism serves YAML files, the command line and Ray Tune search spaces: every
change is a dotted path plus a value, applied by :func:`apply_overrides`, which checks
the path and the type before anything runs. :func:`to_flat_dict` gives the same dotted
paths back, so MLflow's param columns equal the override keys.

A YAML file names a preset and holds only deltas::

    preset: tiny
    model:
      mask:
        prob: 0.5
    train:
      max_steps: 200
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from models import config as model_config
from models.config import ModelConfig
from pipeline.config_sections import (
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    FinetuneConfig,
    LabelConfig,
    OptimConfig,
    ProbeConfig,
    ScalingConfig,
    ScheduleConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "CONFIG_FILE", "PRESETS", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DeepSpeedConfig",
    "FinetuneConfig", "LabelConfig", "ModelConfig", "OptimConfig", "ProbeConfig", "ScalingConfig", "ScheduleConfig",
    "TrackingConfig", "TrainConfig", "apply_overrides", "base", "copy_config", "from_dict", "large", "large_lv60k",
    "laptop", "best_rq", "best_rq_laptop", "hubert", "hubert_laptop", "wavlm", "wavlm_laptop",
    "wav2vec", "wav2vec_laptop", "vq_wav2vec", "vq_wav2vec_laptop",
    "vq_wav2vec_kmeans", "vq_wav2vec_kmeans_laptop", "apc", "apc_laptop", "mockingjay", "mockingjay_laptop", "tera",
    "data2vec", "data2vec2", "data2vec2_laptop", "data2vec_laptop", "vq_bert", "vq_bert_laptop",
    "w2v_bert", "w2v_bert_laptop", "just", "just_laptop",
    "tera_laptop", "load_config", "parse_override", "preset_config", "save_config", "tiny", "to_dict", "to_flat_dict",
]


@dataclass(kw_only=True)
class Config:
    """A whole wavray run."""

    preset: str = "base"
    """The preset the run started from (``tiny``, ``base``, ``large``, ``large_lv60k``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    label: LabelConfig = field(default_factory=LabelConfig)

    def __post_init__(self) -> None:
        # Checks across sections; each section has already checked its own fields.
        self.schedule.check_peak(self.optim.lr)


# --- presets -------------------------------------------------------------------------


def base() -> Config:
    """BASE on LibriSpeech 960 h (SPEC.md), per GPU of a 64-GPU run."""
    return Config(preset="base", model=model_config.base())


def large() -> Config:
    """LARGE (SPEC.md): lr 3e-4, ~1.2M samples per GPU, normalised input."""
    cfg = Config(preset="large", model=model_config.large())
    cfg.optim.lr = 3e-4
    cfg.data.max_samples_per_batch = 1_200_000
    cfg.data.normalize = True
    cfg.train.max_steps = 600_000
    return cfg


def large_lv60k() -> Config:
    """LARGE on LV-60k, fairseq's ``wav2vec2_large_librivox`` values except the lr (SPEC.md)."""
    cfg = large()
    cfg.preset = "large_lv60k"
    cfg.model = model_config.large_lv60k()
    return cfg


def tiny() -> Config:
    """The laptop demo and test configuration: tiny model, short crops, a few hundred steps."""
    cfg = Config(preset="tiny", model=model_config.tiny())
    cfg.data.max_sample_size = 48_000
    cfg.data.min_sample_size = 8_000
    cfg.data.max_samples_per_batch = 192_000
    cfg.data.num_buckets = 4
    cfg.optim.lr = 2e-3
    cfg.schedule.warmup_steps = 20
    cfg.train.max_steps = 200
    cfg.train.log_every = 10
    cfg.checkpoint.every_steps = 50
    cfg.scaling.cpus_per_worker = 0.5
    return cfg


def laptop() -> Config:
    """The tiny model as it learns within a laptop budget (hundreds of updates on 2 CPU cores).

    With the tiny preset's BASE-like settings the contrastive loss stays at chance on the
    demo corpus; fairseq's advice for new models (layer-norm extractor, normalised input,
    full encoder gradient, no feature penalty: SPEC.md), spans that fit 3 s crops and a
    temperature that anneals within the run make it leave chance after a few hundred
    updates (``models.config.laptop``). The demo (``jobs/configs/pretrain/laptop.yaml``)
    and the pretraining-value benchmark start from here.
    """
    cfg = tiny()
    cfg.preset = "laptop"
    cfg.model = model_config.laptop()
    cfg.data.normalize = True
    cfg.optim.lr = 1e-3
    cfg.schedule.warmup_steps = 100
    return cfg


def best_rq() -> Config:
    """BEST-RQ BASE as SpeechBrain's recipe (FAMILY.md section 7), per GPU: AdamW (0.9, 0.98),
    eps 1e-9, weight decay 0.01, Noam schedule to 8e-4 over 25k updates, 300k updates,
    clipping at 10, up to 400 s of audio per batch and 2 accumulated batches per update."""
    cfg = Config(preset="best_rq", model=model_config.best_rq())
    cfg.optim.lr = 8e-4
    cfg.optim.eps = 1e-9
    cfg.optim.clip_grad_norm = 10.0
    cfg.schedule.kind = "noam"
    cfg.schedule.warmup_steps = 25_000
    cfg.train.max_steps = 300_000
    cfg.train.grad_accum = 2
    cfg.data.max_samples_per_batch = 6_400_000
    return cfg


def best_rq_laptop() -> Config:
    """BEST-RQ at the laptop preset's size and data settings (``models.config.best_rq_laptop``):
    what the objectives benchmark and the demo sweep compare with wav2vec 2.0."""
    cfg = laptop()
    cfg.preset = "best_rq_laptop"
    cfg.model = model_config.best_rq_laptop()
    cfg.optim.clip_grad_norm = 10.0
    return cfg


def hubert() -> Config:
    """HuBERT BASE as fairseq's ``hubert_base_librispeech`` (FAMILY.md section 1), per GPU of a
    32-GPU run: Adam (0.9, 0.98), eps 1e-6, weight decay 0.01, lr 5e-4 with 32k warmup
    updates and a linear decay, clipping at 10, crops of 250k samples (at least 32k), 1.4M
    samples per batch; the first iteration's 250k updates on 100 MFCC clusters (the second:
    ``jobs/configs/pretrain/hubert_it2.yaml``, 400k updates on 500 clusters of layer 6)."""
    cfg = Config(preset="hubert", model=model_config.hubert())
    cfg.optim.lr = 5e-4
    cfg.optim.clip_grad_norm = 10.0
    cfg.schedule.warmup_steps = 32_000
    cfg.train.max_steps = 250_000
    cfg.data.max_samples_per_batch = 1_400_000
    return cfg


def hubert_laptop() -> Config:
    """HuBERT at the laptop preset's size and data settings (``models.config.hubert_laptop``):
    what learns on the demo corpus within minutes of CPU, 100 MFCC clusters first."""
    cfg = laptop()
    cfg.preset = "hubert_laptop"
    cfg.model = model_config.hubert_laptop()
    cfg.optim.clip_grad_norm = 10.0
    cfg.label.sample_fraction = 0.5
    cfg.label.max_sample_frames = 200_000
    cfg.label.n_init = 5
    return cfg


def wavlm() -> Config:
    """WavLM BASE: HuBERT BASE's recipe with the gated relative bias and utterance mixing
    (``models.config.wavlm``); the values WavLM was trained with are not published in code
    (FAMILY.md section 2), so the optimisation is HuBERT's."""
    cfg = hubert()
    cfg.preset = "wavlm"
    cfg.model = model_config.wavlm()
    return cfg


def wavlm_laptop() -> Config:
    """WavLM at the laptop size (``models.config.wavlm_laptop``), HuBERT laptop's recipe."""
    cfg = hubert_laptop()
    cfg.preset = "wavlm_laptop"
    cfg.model = model_config.wavlm_laptop()
    return cfg


def wav2vec() -> Config:
    """wav2vec (1.0) as fairseq's README command (FAMILY.md section 9), per GPU: Adam with
    fairseq's defaults ((0.9, 0.999), eps 1e-8, no weight decay), 500 warm-up updates to
    5e-3 then a cosine to 1e-6 over 400k updates, crops of 150k samples, 1.5M samples per batch."""
    cfg = Config(preset="wav2vec", model=model_config.wav2vec())
    _fairseq_adam(cfg, lr=5e-3, warmup=500)
    cfg.data.max_sample_size = 150_000
    cfg.data.max_samples_per_batch = 1_500_000
    return cfg


def vq_wav2vec() -> Config:
    """vq-wav2vec (Gumbel) as fairseq's README command, per GPU of 16: wav2vec's optimiser with
    1,000 warm-up updates to 1e-5, then a cosine to 1e-6; 300k samples per batch."""
    cfg = Config(preset="vq_wav2vec", model=model_config.vq_wav2vec())
    _fairseq_adam(cfg, lr=1e-5, warmup=1000)
    cfg.data.max_sample_size = 150_000
    cfg.data.max_samples_per_batch = 300_000
    return cfg


def vq_wav2vec_kmeans() -> Config:
    """vq-wav2vec (k-means) as the README: the Gumbel run's settings with the k-means quantizer."""
    cfg = vq_wav2vec()
    cfg.preset = "vq_wav2vec_kmeans"
    cfg.model = model_config.vq_wav2vec_kmeans()
    return cfg


def _fairseq_adam(cfg: Config, *, lr: float, warmup: int) -> None:
    """fairseq's ``adam`` and ``cosine`` as wav2vec's README commands use them (warm-up from 0
    instead of 1e-7)."""
    cfg.optim.lr = lr
    cfg.optim.betas = [0.9, 0.999]
    cfg.optim.eps = 1e-8
    cfg.optim.weight_decay = 0.0
    cfg.schedule.kind = "cosine"
    cfg.schedule.warmup_steps = warmup
    cfg.schedule.end_lr = 1e-6
    cfg.train.max_steps = 400_000


def apc() -> Config:
    """APC as s3prl's runner (FAMILY.md section 10): Adam (0.9, 0.999) at a constant 1e-4,
    clipping at 5, 8 utterances of at most 15 s (1,500 frames) per batch, 4 batches per update;
    100 epochs of LibriSpeech 960 h are about 880k such updates [derived]."""
    cfg = Config(preset="apc", model=model_config.apc())
    _s3prl_batches(cfg)
    cfg.optim.lr = 1e-4
    cfg.optim.betas = [0.9, 0.999]
    cfg.optim.eps = 1e-8
    cfg.optim.weight_decay = 0.0
    cfg.schedule.kind = "tri_stage"  # warm-up 0, held for the whole run: a constant rate
    cfg.schedule.warmup_steps = 0
    cfg.schedule.hold_ratio = 1.0
    cfg.schedule.decay_ratio = 0.0
    cfg.train.max_steps = 880_000
    return cfg


def mockingjay() -> Config:
    """Mockingjay as s3prl's runner (FAMILY.md section 10): AdamW (weight decay 0.01; s3prl
    exempts biases and LayerNorms, wavray decays every parameter) to 2e-4 over 7% of 1M
    updates, then linearly to 0; clipping at 5; 8 utterances of at most 15 s per batch, 4
    batches per update."""
    cfg = Config(preset="mockingjay", model=model_config.mockingjay())
    _s3prl_batches(cfg)
    cfg.optim.lr = 2e-4
    cfg.optim.betas = [0.9, 0.999]
    cfg.optim.weight_decay = 0.01
    cfg.schedule.kind = "polynomial"
    cfg.schedule.warmup_steps = 70_000
    cfg.train.max_steps = 1_000_000
    return cfg


def tera() -> Config:
    """TERA as s3prl's runner: Mockingjay's."""
    cfg = mockingjay()
    cfg.preset = "tera"
    cfg.model = model_config.tera()
    return cfg


def _s3prl_batches(cfg: Config) -> None:
    """s3prl's pretraining batches: 8 utterances of 2 to 15 s (200 to 1,500 frames) from
    length buckets, 4 batches per update, gradients clipped at 5."""
    cfg.data.max_sample_size = 240_000
    cfg.data.min_sample_size = 32_000
    cfg.data.max_samples_per_batch = 8 * 240_000
    cfg.train.grad_accum = 4
    cfg.optim.clip_grad_norm = 5.0


def _laptop_objective(preset: str, model: ModelConfig) -> Config:
    """``model`` with the laptop preset's data, optimiser and budget: the rows of the
    objectives benchmark differ in the objective alone."""
    cfg = laptop()
    cfg.preset = preset
    cfg.model = model
    return cfg


def wav2vec_laptop() -> Config:
    """wav2vec at the laptop presets' size (``models.config.wav2vec_laptop``)."""
    return _laptop_objective("wav2vec_laptop", model_config.wav2vec_laptop())


def vq_wav2vec_laptop() -> Config:
    """vq-wav2vec (Gumbel) at the laptop presets' size."""
    return _laptop_objective("vq_wav2vec_laptop", model_config.vq_wav2vec_laptop())


def vq_wav2vec_kmeans_laptop() -> Config:
    """vq-wav2vec (k-means) at the laptop presets' size."""
    return _laptop_objective("vq_wav2vec_kmeans_laptop", model_config.vq_wav2vec_kmeans_laptop())


def apc_laptop() -> Config:
    """APC at the laptop presets' size; clipping at 5 as its recipe."""
    cfg = _laptop_objective("apc_laptop", model_config.apc_laptop())
    cfg.optim.clip_grad_norm = 5.0
    return cfg


def mockingjay_laptop() -> Config:
    """Mockingjay at the laptop presets' size; clipping at 5 as its recipe."""
    cfg = _laptop_objective("mockingjay_laptop", model_config.mockingjay_laptop())
    cfg.optim.clip_grad_norm = 5.0
    return cfg


def tera_laptop() -> Config:
    """TERA at the laptop presets' size; clipping at 5 as its recipe."""
    cfg = _laptop_objective("tera_laptop", model_config.tera_laptop())
    cfg.optim.clip_grad_norm = 5.0
    return cfg


def data2vec() -> Config:
    """data2vec 1.0 BASE (``models.config.data2vec``), per GPU of fairseq's 16: Adam (0.9, 0.98),
    eps 1e-6, weight decay 0.01, lr 5e-4 on the tri-stage schedule (3% warm-up, 90% hold,
    7% decay, from and to 1% of the peak), 400k updates, 3.8M samples (237 s) per batch,
    crops of 2-20 s, normalised input."""
    cfg = Config(preset="data2vec", model=model_config.data2vec())
    cfg.optim.lr = 5e-4
    cfg.schedule.kind = "tri_stage"
    cfg.schedule.warmup_steps = 12_000
    cfg.schedule.hold_ratio = 0.9
    cfg.schedule.decay_ratio = 0.07
    cfg.schedule.final_lr_scale = 0.01
    cfg.train.max_steps = 400_000
    cfg.data.max_samples_per_batch = 3_800_000
    cfg.data.max_sample_size = 320_000
    cfg.data.normalize = True
    return cfg


def data2vec2() -> Config:
    """data2vec 2.0 BASE (``models.config.data2vec2``), per GPU of fairseq's 8: lr 7.5e-4 after
    8k warm-up updates, 400k updates, 1M samples (62.5 s) per batch before the 8 clones,
    normalised input. fairseq decays the lr on a cosine; wavray's polynomial schedule
    (linear decay) stands in for it here."""
    cfg = Config(preset="data2vec2", model=model_config.data2vec2())
    cfg.optim.lr = 7.5e-4
    cfg.schedule.warmup_steps = 8_000
    cfg.train.max_steps = 400_000
    cfg.data.max_samples_per_batch = 1_000_000
    cfg.data.max_sample_size = 320_000
    cfg.data.normalize = True
    return cfg


def data2vec_laptop() -> Config:
    """data2vec 1.0 at the laptop preset's size and data settings (``models.config.data2vec_laptop``)."""
    cfg = laptop()
    cfg.preset = "data2vec_laptop"
    cfg.model = model_config.data2vec_laptop()
    return cfg


def data2vec2_laptop() -> Config:
    """data2vec 2.0 at the laptop preset's size and data settings (``models.config.data2vec2_laptop``)."""
    cfg = laptop()
    cfg.preset = "data2vec2_laptop"
    cfg.model = model_config.data2vec2_laptop()
    return cfg


def vq_bert() -> Config:
    """vq-wav2vec's BERT BASE as its paper and fairseq's ``masked_lm`` command on the tokens
    (``roberta_base``; FAMILY.md section 9 has no BERT values): Adam (0.9, 0.98), eps 1e-6,
    weight decay 0.01, lr 5e-4 with 10k warm-up updates and a linear (polynomial) decay over
    250k updates, no clipping. The tokens come from ``jobs.label label.features=tokens
    label.teacher=<the vq-wav2vec model>``; the vocabulary is built on every train utterance
    (``label.sample_fraction`` 1)."""
    cfg = Config(preset="vq_bert", model=model_config.vq_bert())
    cfg.optim.lr = 5e-4
    cfg.optim.betas = [0.9, 0.98]
    cfg.optim.eps = 1e-6
    cfg.optim.weight_decay = 0.01
    cfg.optim.clip_grad_norm = 0.0
    cfg.schedule.kind = "polynomial"
    cfg.schedule.warmup_steps = 10_000
    cfg.train.max_steps = 250_000
    cfg.label.features = "tokens"
    cfg.label.sample_fraction = 1.0
    return cfg


def vq_bert_laptop() -> Config:
    """vq-wav2vec's BERT at the laptop presets' size (``models.config.vq_bert_laptop``) on the
    tokens of a ``vq_wav2vec_laptop`` model."""
    cfg = _laptop_objective("vq_bert_laptop", model_config.vq_bert_laptop())
    cfg.label.features = "tokens"
    cfg.label.sample_fraction = 1.0
    return cfg


def w2v_bert() -> Config:
    """w2v-BERT as fairseq2's ``600m`` architecture (``models.config.w2v_bert``). FAMILY.md gives
    no optimisation for it (fairseq2 ships none), so the run is wav2vec 2.0 LARGE's (SPEC.md):
    lr 3e-4, about 1.2M samples per GPU, 600k updates."""
    cfg = large()
    cfg.preset = "w2v_bert"
    cfg.model = model_config.w2v_bert()
    return cfg


def w2v_bert_laptop() -> Config:
    """w2v-BERT at ``best_rq_laptop``'s size and with the laptop data settings
    (``models.config.w2v_bert_laptop``): what the objectives benchmark compares."""
    cfg = laptop()
    cfg.preset = "w2v_bert_laptop"
    cfg.model = model_config.w2v_bert_laptop()
    cfg.optim.clip_grad_norm = 10.0
    return cfg


def just() -> Config:
    """JUST at w2v-BERT's ``600m`` size (``models.config.just``), w2v-BERT's run: a prepared
    dataset whose labelled utterances carry transcripts, read whole (``data.batch_mode`` pad,
    no crop: a cropped utterance no longer matches its transcript), the CTC vocabulary
    the characters of the transcripts (``finetune.vocab_from_data``)."""
    cfg = w2v_bert()
    cfg.preset = "just"
    cfg.model = model_config.just()
    _just_data(cfg)
    return cfg


def just_laptop() -> Config:
    """JUST at ``w2v_bert_laptop``'s size and settings (``models.config.just_laptop``), on the
    multilingual demo corpus (``jobs.demo_corpus --languages ... --labelled-fraction``)."""
    cfg = w2v_bert_laptop()
    cfg.preset = "just_laptop"
    cfg.model = model_config.just_laptop()
    _just_data(cfg)
    return cfg


def _just_data(cfg: Config) -> None:
    cfg.data.batch_mode = "pad"
    cfg.finetune.vocab_from_data = True
    if cfg.data.max_sample_size < 160_000:  # the laptop crops: whole demo utterances instead (up to 10 s)
        cfg.data.max_sample_size = 160_000
        cfg.data.max_samples_per_batch = max(cfg.data.max_samples_per_batch, 240_000)


PRESETS = {
    "tiny": tiny, "base": base, "large": large, "large_lv60k": large_lv60k, "laptop": laptop,
    "best_rq": best_rq, "best_rq_laptop": best_rq_laptop,
    "hubert": hubert, "hubert_laptop": hubert_laptop, "wavlm": wavlm, "wavlm_laptop": wavlm_laptop,
    "wav2vec": wav2vec, "wav2vec_laptop": wav2vec_laptop, "vq_wav2vec": vq_wav2vec,
    "vq_wav2vec_laptop": vq_wav2vec_laptop, "vq_wav2vec_kmeans": vq_wav2vec_kmeans,
    "vq_wav2vec_kmeans_laptop": vq_wav2vec_kmeans_laptop, "apc": apc, "apc_laptop": apc_laptop,
    "mockingjay": mockingjay, "mockingjay_laptop": mockingjay_laptop, "tera": tera, "tera_laptop": tera_laptop,
    "data2vec": data2vec, "data2vec_laptop": data2vec_laptop, "data2vec2": data2vec2,
    "data2vec2_laptop": data2vec2_laptop,
    "vq_bert": vq_bert, "vq_bert_laptop": vq_bert_laptop,
    "w2v_bert": w2v_bert, "w2v_bert_laptop": w2v_bert_laptop,
    "just": just, "just_laptop": just_laptop,
}


# --- the override mechanism ----------------------------------------------------------


class ConfigError(ValueError):
    """A config key, value or file that cannot be used; raised before any work starts."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(path, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} matches none of {tp}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{path}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {tp}")


RENAMED_KEYS = {
    "train.ctc_vocab": "finetune.vocab",
    "train.freeze_encoder_steps": "finetune.freeze_encoder_steps",
}
"""Keys that moved: configs saved before the move (in checkpoints) still load."""


def _set_path(cfg: Any, path: str, value: Any) -> None:
    if path in RENAMED_KEYS:
        warnings.warn(f"config key '{path}' is now '{RENAMED_KEYS[path]}'", stacklevel=3)
        path = RENAMED_KEYS[path]
    parts = path.split(".")
    node = cfg
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"{here}: {'.'.join(parts[:depth])} is a value, not a section")
        types_ = _field_types(type(node))
        if part not in types_:
            prefix = ".".join(parts[:depth])
            valid = ", ".join(sorted(types_))
            where = f"section '{prefix}'" if prefix else "the top level"
            raise ConfigError(f"unknown config key '{here}': valid keys in {where} are: {valid}")
        if depth == len(parts) - 1:
            current = getattr(node, part)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"{here}: is a section; expected a mapping, got {value!r}")
                for key, sub in value.items():
                    _set_path(cfg, f"{here}.{key}", sub)
                return
            setattr(node, part, _coerce(here, types_[part], value))
        else:
            node = getattr(node, part)


def _revalidate(node: Any) -> None:
    """Re-run every section's ``__post_init__`` checks, children first."""
    for f in dataclasses.fields(node):
        child = getattr(node, f.name)
        if dataclasses.is_dataclass(child):
            _revalidate(child)
    post = getattr(node, "__post_init__", None)
    if post is not None:
        try:
            post()
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _flatten_mapping(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten_mapping(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"model.mask.prob=0.5"`` -> ``("model.mask.prob", 0.5)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected the form a.b.c=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from None
    return key, value


def apply_overrides(cfg: Config, overrides: dict[str, Any] | list[str] | None) -> Config:
    """Return a copy of ``cfg`` with dotted-path overrides applied and validated.

    ``overrides`` is a mapping ``{"model.mask.prob": 0.5}`` (Ray Tune search spaces,
    nested mappings allowed) or a list of ``"a.b.c=value"`` strings (command line).
    """
    new = copy_config(cfg)
    if not overrides:
        return new
    if isinstance(overrides, list):
        items = [parse_override(o) for o in overrides]
    else:
        flat: dict[str, Any] = {}
        _flatten_mapping("", overrides, flat)
        items = list(flat.items())
    for key, value in items:
        if key == "preset":
            if value != new.preset:
                raise ConfigError(
                    f"preset: cannot change the preset of a built config ({new.preset!r} -> {value!r}); "
                    "choose it in the YAML file or with load_config(preset=...)"
                )
            continue
        _set_path(new, key, value)
    _revalidate(new)
    return new


def copy_config(cfg: Config) -> Config:
    """A deep copy (configs are mutated by presets and overrides)."""
    return from_dict(to_dict(cfg))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (YAML/JSON-ready)."""
    return dataclasses.asdict(cfg)


def to_flat_dict(cfg: Any) -> dict[str, Any]:
    """``{"model.mask.prob": 0.65, ...}``: the params MLflow logs, keyed like overrides."""
    out: dict[str, Any] = {}
    _flatten_mapping("", to_dict(cfg), out)
    return out


def from_dict(data: dict[str, Any]) -> Config:
    """Build a config from a full nested dict (e.g. the resolved config of a checkpoint)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
    preset = data.get("preset", "base")
    cfg = preset_config(preset)
    rest = {k: v for k, v in data.items() if k != "preset"}
    flat: dict[str, Any] = {}
    _flatten_mapping("", rest, flat)
    for key, value in flat.items():
        _set_path(cfg, key, value)
    _revalidate(cfg)
    return cfg


def preset_config(name: str) -> Config:
    """The named preset (``tiny``, ``base``, ``large``, ``large_lv60k``)."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; valid presets are: {', '.join(PRESETS)}")
    return PRESETS[name]()


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    preset: str | None = None,
) -> Config:
    """Preset (from the file's ``preset:`` key or the argument) + file deltas + overrides."""
    deltas: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r}: expected a mapping at the top level")
        deltas = dict(loaded)
    name = preset or deltas.pop("preset", None) or "base"
    deltas.pop("preset", None)
    cfg = preset_config(name)
    try:
        for key, value in deltas.items():
            _set_path(cfg, key, value)
        _revalidate(cfg)
    except ConfigError as e:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{e}{where}") from None
    return apply_overrides(cfg, overrides)


CONFIG_FILE = "config.yaml"
"""The resolved config beside every checkpoint and model a run writes."""


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (saved next to every checkpoint)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
