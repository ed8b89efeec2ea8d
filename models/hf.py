"""Hugging Face interop without importing ``transformers``: config and weights, both ways.

A Hugging Face model directory is ``config.json`` + ``model.safetensors`` (or the older
``pytorch_model.bin``, possibly sharded with an ``*.index.json``). This module writes
directories that ``transformers.Wav2Vec2ForPreTraining`` / ``Wav2Vec2ForCTC``
``from_pretrained`` load without missing or unexpected keys, and reads directories of
``Wav2Vec2ForPreTraining``, ``Wav2Vec2Model`` and ``Wav2Vec2ForCTC`` into our models.
A model whose ``model.transformer.kind`` is ``conformer`` goes to and comes from the
``Wav2Vec2Conformer*`` classes instead (``model_type`` ``wav2vec2-conformer``; their
names, fields and limits are in ``models.hf_conformer``), a HuBERT or WavLM encoder to and
from ``HubertModel`` / ``HubertForCTC`` / ``WavLMModel`` / ``WavLMForCTC`` (``models.hf_hubert``),
and a data2vec encoder (a stacked conv positional embedding,
``model.transformer.pos_conv_depth`` > 1) to and from ``Data2VecAudioModel`` /
``Data2VecAudioForCTC`` (``models.hf_data2vec``). Reading dispatches on ``model_type`` in
config.json, and state dicts on their own keys (a conformer's layers have a depthwise
convolution, data2vec's positional embedding is a stack, HuBERT's and WavLM's classes
name their base model), so the same functions serve them all.

Settings that Hugging Face's config has no field for (feature-encoder gradient scale,
Gumbel temperature schedule, feature-penalty weight) travel in a ``"wavray"`` entry of
``config.json``; ``transformers`` keeps unknown entries as plain attributes.

Weights are read safely: safetensors first, ``.bin`` only with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from models import hf_conformer, hf_data2vec, hf_hubert
from models.checkpoint import WEIGHTS_NAME, check_shapes, save_weights
from models.config import (
    FeatureEncoderConfig,
    HubertConfig,
    LossConfig,
    MaskConfig,
    ModelConfig,
    QuantizerConfig,
    TemperatureConfig,
    TransformerConfig,
)
from models.factory import build_ctc_model, build_pretraining_model
from models.wav2vec2 import Wav2Vec2ForCTC, Wav2Vec2ForPretraining

HF_PRETRAINING = "Wav2Vec2ForPreTraining"
HF_CTC = "Wav2Vec2ForCTC"
HF_CONFIG = "config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
_BASE_PREFIX = "wav2vec2."

# --- state dict: our key (relative to ``encoder.``) <-> HF key (relative to the base model) --

# Shared by the Transformer and the Conformer models.
_FRONT_TO_HF: list[tuple[str, str]] = [
    (r"feature_encoder\.layers\.(\d+)\.conv\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_encoder\.layers\.(\d+)\.norm\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"feature_projection\.norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"feature_projection\.linear\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"mask_embedding\.weight", r"masked_spec_embed"),
    (r"transformer\.norm\.(weight|bias)", r"encoder.layer_norm.\1"),
]
_ENCODER_TO_HF: list[tuple[str, str]] = _FRONT_TO_HF + [
    (r"transformer\.pos_conv\.weight_g", r"encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"transformer\.pos_conv\.weight_v", r"encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"transformer\.pos_conv\.bias", r"encoder.pos_conv_embed.conv.bias"),
    (r"transformer\.layers\.(\d+)\.attention\.out_proj\.(weight|bias)", r"encoder.layers.\1.attention.out_proj.\2"),
    (r"transformer\.layers\.(\d+)\.attn_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
    (r"transformer\.layers\.(\d+)\.ffn\.fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"transformer\.layers\.(\d+)\.ffn\.fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"transformer\.layers\.(\d+)\.ffn_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
]
_QKV_OURS = re.compile(r"transformer\.layers\.(\d+)\.attention\.qkv\.(weight|bias)")
_QKV_HF = re.compile(r"encoder\.layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)")

_FRONT_FROM_HF: list[tuple[str, str]] = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)", r"feature_encoder.layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)", r"feature_encoder.layers.\1.norm.\2"),
    (r"feature_projection\.layer_norm\.(weight|bias)", r"feature_projection.norm.\1"),
    (r"feature_projection\.projection\.(weight|bias)", r"feature_projection.linear.\1"),
    (r"masked_spec_embed", r"mask_embedding.weight"),
    (r"encoder\.layer_norm\.(weight|bias)", r"transformer.norm.\1"),
]
_HF_TO_ENCODER: list[tuple[str, str]] = _FRONT_FROM_HF + [
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0", r"transformer.pos_conv.weight_g"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1", r"transformer.pos_conv.weight_v"),
    # checkpoints written before torch's parametrized weight norm
    (r"encoder\.pos_conv_embed\.conv\.weight_g", r"transformer.pos_conv.weight_g"),
    (r"encoder\.pos_conv_embed\.conv\.weight_v", r"transformer.pos_conv.weight_v"),
    (r"encoder\.pos_conv_embed\.conv\.bias", r"transformer.pos_conv.bias"),
    (r"encoder\.layers\.(\d+)\.attention\.out_proj\.(weight|bias)", r"transformer.layers.\1.attention.out_proj.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm\.(weight|bias)", r"transformer.layers.\1.attn_norm.\2"),
    (r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(weight|bias)", r"transformer.layers.\1.ffn.fc1.\2"),
    (r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.(weight|bias)", r"transformer.layers.\1.ffn.fc2.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"transformer.layers.\1.ffn_norm.\2"),
]
# data2vec's stacked positional embedding (its only weights that wav2vec 2.0 names otherwise)
_ENCODER_TO_HF += hf_data2vec.POS_CONV_TO_HF
_HF_TO_ENCODER += hf_data2vec.POS_CONV_FROM_HF

# WavLM's gated relative position bias (only a gated encoder has these keys).
_ENCODER_TO_HF += hf_hubert.GATED_TO_HF
_HF_TO_ENCODER += hf_hubert.GATED_FROM_HF

_CONFORMER_TO_HF = _FRONT_TO_HF + hf_conformer.LAYERS_TO_HF
_CONFORMER_FROM_HF = _FRONT_FROM_HF + hf_conformer.LAYERS_FROM_HF

# Our pretraining heads <-> HF ``Wav2Vec2ForPreTraining`` heads (same names except final_proj).
_HEADS_TO_HF = {
    "quantizer.codevectors": "quantizer.codevectors",
    "quantizer.weight_proj.weight": "quantizer.weight_proj.weight",
    "quantizer.weight_proj.bias": "quantizer.weight_proj.bias",
    "project_q.weight": "project_q.weight",
    "project_q.bias": "project_q.bias",
    "final_proj.weight": "project_hid.weight",
    "final_proj.bias": "project_hid.bias",
}
_CTC_TO_HF = {"head.weight": "lm_head.weight", "head.bias": "lm_head.bias"}
# Ours only: the Gumbel temperature buffer (its schedule travels in config.json).
_OURS_ONLY = {"quantizer.temperature"}


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, template in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
    return None


def is_conformer_state(state: dict[str, Tensor]) -> bool:
    """Whether a state dict, ours or Hugging Face's (any prefix), holds Conformer layers."""
    return any(
        re.fullmatch(hf_conformer.OUR_LAYER_KEY, k) or re.fullmatch(hf_conformer.HF_LAYER_KEY, k) for k in state
    )


def _base_prefix(conformer: bool) -> str:
    return hf_conformer.BASE_PREFIX if conformer else _BASE_PREFIX


def _hf_prefix(state: dict[str, Tensor]) -> str:
    """The base model's prefix in the heads-carrying Hugging Face classes of the architecture
    ``state`` holds (a state dict of ours or of Hugging Face's)."""
    if hf_data2vec.is_data2vec_state(state):
        return hf_data2vec.BASE_PREFIX
    for prefix in hf_hubert.PREFIXES.values():
        if any(k.startswith(prefix) for k in state):
            return prefix
    return _base_prefix(is_conformer_state(state))


def encoder_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our ``Wav2Vec2Encoder`` state dict -> HF ``Wav2Vec2Model`` / ``Wav2Vec2ConformerModel`` keys (no prefix).

    The conformer's output lacks the tensors Hugging Face holds but never runs
    (``hf_conformer.unused_hf_weights``).
    """
    rules = _CONFORMER_TO_HF if is_conformer_state(state) else _ENCODER_TO_HF
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = _QKV_OURS.fullmatch(key)
        if m:
            layer, kind = m.groups()
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"encoder.layers.{layer}.attention.{name}_proj.{kind}"] = part.contiguous().clone()
            continue
        new = _rename(key, rules)
        if new is None:
            raise ValueError(f"state dict: no Hugging Face name for encoder key {key!r}")
        out[new] = value.contiguous().clone()
    return out


def encoder_from_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF ``Wav2Vec2Model`` / ``Wav2Vec2ConformerModel`` keys (no prefix) -> our ``Wav2Vec2Encoder`` state dict.

    The tensors Hugging Face's conformer holds but never runs are dropped.
    """
    conformer = is_conformer_state(state)
    rules = _CONFORMER_FROM_HF if conformer else _HF_TO_ENCODER
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if conformer and re.fullmatch(hf_conformer.HF_UNUSED, key):
            continue
        m = _QKV_HF.fullmatch(key)
        if m:
            layer, name, kind = m.groups()
            qkv.setdefault((layer, kind), {})[name] = value
            continue
        new = _rename(key, rules)
        if new is None:
            raise ValueError(
                f"Hugging Face state dict: unsupported key {key!r} (adapters and other add-ons of "
                "Wav2Vec2Model cannot be represented)"
            )
        out[new] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(
                f"Hugging Face state dict: layer {layer} attention {kind}: expected q, k and v "
                f"projections, got {sorted(parts)}"
            )
        out[f"transformer.layers.{layer}.attention.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def pretraining_state_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our ``Wav2Vec2ForPretraining`` state dict -> HF ``Wav2Vec2ForPreTraining`` state dict
    (``Wav2Vec2ConformerForPreTraining`` for a conformer, less ``unused_hf_weights``)."""
    enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    prefix = _hf_prefix(enc)
    out = {prefix + k: v for k, v in encoder_to_hf(enc).items()}
    for key, value in state.items():
        if key.startswith("encoder.") or key in _OURS_ONLY:
            continue
        if key not in _HEADS_TO_HF:
            raise ValueError(f"state dict: no Hugging Face name for key {key!r}")
        out[_HEADS_TO_HF[key]] = value.contiguous().clone()
    return out


def ctc_state_to_hf(state: dict[str, Tensor], *, prefix: str | None = None) -> dict[str, Tensor]:
    """Our ``Wav2Vec2ForCTC`` state dict -> HF ``Wav2Vec2ForCTC`` state dict
    (``Wav2Vec2ConformerForCTC`` for a conformer, less ``unused_hf_weights``); ``prefix``: the
    base model's name of another class (``hubert.``, ``wavlm.``)."""
    enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    prefix = prefix or _hf_prefix(enc)
    out = {prefix + k: v for k, v in encoder_to_hf(enc).items()}
    for key, value in state.items():
        if key.startswith("encoder."):
            continue
        if key not in _CTC_TO_HF:
            raise ValueError(f"state dict: no Hugging Face name for key {key!r}")
        out[_CTC_TO_HF[key]] = value.contiguous().clone()
    return out


def split_hf_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """HF state dict (any of the three classes, wav2vec 2.0 or Conformer) -> (our encoder keys,
    our pretraining heads, CTC head); HuBERT's and WavLM's classes too."""
    prefix = _hf_prefix(state)
    prefixed = any(k.startswith(prefix) for k in state)
    base: dict[str, Tensor] = {}
    heads: dict[str, Tensor] = {}
    ctc: dict[str, Tensor] = {}
    from_hf_heads = {v: k for k, v in _HEADS_TO_HF.items()}
    from_hf_ctc = {v: k for k, v in _CTC_TO_HF.items()}
    for key, value in state.items():
        if prefixed and key.startswith(prefix):
            base[key[len(prefix):]] = value
        elif key in from_hf_heads:
            heads[from_hf_heads[key]] = value
        elif key in from_hf_ctc:
            ctc[from_hf_ctc[key]] = value
        elif not prefixed:
            base[key] = value
        else:
            raise ValueError(f"Hugging Face state dict: unsupported key {key!r}")
    enc = {"encoder." + k: v for k, v in encoder_from_hf(base).items()}
    return enc, heads, ctc


# --- config ---------------------------------------------------------------------------------


def hf_unsupported(cfg: ModelConfig) -> str:
    """Why Hugging Face has no class for the encoder of ``cfg``; empty when it has one
    (``Wav2Vec2Model``, ``Wav2Vec2ConformerModel``, HuBERT's and WavLM's, ``Data2VecAudioModel``)."""
    if cfg.objective == "vq_bert":
        return "model.objective=vq_bert: a BERT on vq-wav2vec's tokens reads no waveform; Wav2Vec2Model has no place for it"
    if cfg.frontend.kind != "conv":
        return (
            f"model.frontend.kind={cfg.frontend.kind!r}: Hugging Face's Wav2Vec2 and Wav2Vec2Conformer models read "
            "the waveform through their conv feature encoder and have no place for a log-mel front end"
        )
    if cfg.encoder.mode not in ("default", "layer_norm"):
        return (
            f"model.encoder.mode={cfg.encoder.mode!r}: wav2vec 1.0's conv feature encoder (GroupNorm after every "
            "conv, log compression) has no Hugging Face class"
        )
    if cfg.transformer.kind not in ("transformer", "conformer"):
        return f"model.transformer.kind={cfg.transformer.kind!r}: this context network has no Hugging Face class"
    if cfg.transformer.absolute_positions:
        return "model.transformer.absolute_positions: Hugging Face's Wav2Vec2 has conv positions only"
    if _data2vec_encoder(cfg):
        return "; ".join(hf_data2vec.problems(cfg))
    return ""


def _data2vec_encoder(cfg: ModelConfig) -> bool:
    """Whether ``cfg``'s encoder has data2vec's options (a stacked positional embedding or
    ALiBi): it exports as ``Data2VecAudioModel`` where Hugging Face has a class for it."""
    return cfg.transformer.pos_conv_depth > 1 or cfg.transformer.alibi


def model_config_to_hf(
    cfg: ModelConfig,
    *,
    architecture: str = HF_PRETRAINING,
    vocab_size: int | None = None,
    pad_token_id: int = 0,
    temperature: float | None = None,
) -> dict[str, Any]:
    """``ModelConfig`` -> the ``config.json`` dict of a HF ``Wav2Vec2Config``
    (``Wav2Vec2ConformerConfig`` for a conformer, whose ``architecture`` is then the
    conformer class of the wav2vec 2.0 name given).

    ``temperature`` is the current Gumbel temperature (recorded, HF does not use it).
    Raises ``ValueError`` for a conformer Hugging Face cannot represent.
    """
    problem = hf_unsupported(cfg)
    if problem:
        raise ValueError(f"{problem}; the model stays a wavray checkpoint (config.yaml + model.safetensors)")
    if _data2vec_encoder(cfg):
        return hf_data2vec.config_to_hf(cfg, architecture=architecture, vocab_size=vocab_size,
                                        pad_token_id=pad_token_id)
    enc, tr, mask, q, loss = cfg.encoder, cfg.transformer, cfg.mask, cfg.quantizer, cfg.loss
    hf: dict[str, Any] = {
        "model_type": "wav2vec2",
        "architectures": [architecture],
        "conv_dim": [int(c) for c, _, _ in enc.conv_layers],
        "conv_kernel": [int(k) for _, k, _ in enc.conv_layers],
        "conv_stride": [int(s) for _, _, s in enc.conv_layers],
        "num_feat_extract_layers": len(enc.conv_layers),
        "conv_bias": enc.conv_bias,
        "feat_extract_norm": "layer" if enc.mode == "layer_norm" else "group",
        "feat_extract_activation": "gelu",
        "hidden_size": tr.dim,
        "num_hidden_layers": tr.num_layers,
        "num_attention_heads": tr.num_heads,
        "intermediate_size": tr.ffn_dim,
        "hidden_act": "gelu",
        "hidden_dropout": tr.dropout,
        "attention_dropout": tr.attention_dropout,
        "activation_dropout": tr.activation_dropout,
        "layerdrop": tr.layerdrop,
        "do_stable_layer_norm": tr.layer_norm_first,
        "num_conv_pos_embeddings": tr.pos_conv_kernel,
        "num_conv_pos_embedding_groups": tr.pos_conv_groups,
        "layer_norm_eps": 1e-5,
        "feat_proj_dropout": cfg.dropout_input,
        "feat_quantizer_dropout": cfg.dropout_features,
        "final_dropout": cfg.final_dropout,
        "apply_spec_augment": True,
        "mask_time_prob": mask.prob,
        "mask_time_length": mask.length,
        "mask_time_min_masks": mask.min_masks,
        "mask_feature_prob": mask.channel_prob,
        "mask_feature_length": mask.channel_length,
        "mask_feature_min_masks": 0,
        "num_codevectors_per_group": q.entries,
        "num_codevector_groups": q.groups,
        "codevector_dim": cfg.codevector_dim,
        "proj_codevector_dim": cfg.final_dim,
        "contrastive_logits_temperature": loss.logit_temp,
        "num_negatives": loss.num_negatives,
        "diversity_loss_weight": loss.diversity_weight,
        "add_adapter": False,
        "use_weighted_layer_sum": False,
        "pad_token_id": pad_token_id,
        "ctc_loss_reduction": "sum",
        "ctc_zero_infinity": True,
        "wavray": {
            "encoder_grad_mult": enc.grad_mult,
            "temperature_start": q.temperature.start,
            "temperature_end": q.temperature.end,
            "temperature_decay": q.temperature.decay,
            "feature_penalty_weight": loss.feature_penalty_weight,
            **({"temperature": temperature} if temperature is not None else {}),
        },
    }
    if vocab_size is not None:
        hf["vocab_size"] = vocab_size
    if tr.kind == "conformer":
        del hf["do_stable_layer_norm"]  # not read by Hugging Face's conformer
        hf.update(hf_conformer.config_to_hf(tr))
        if not architecture.startswith("Wav2Vec2Conformer"):
            hf["architectures"] = [hf_conformer.architecture_name(architecture)]
    kind = hf_hubert.family(cfg)
    if kind is not None:
        hf.update(hf_hubert.config_to_hf(cfg, kind))
        hf["architectures"] = [hf_hubert.architecture_name(kind, architecture)]
        hf["wavray"]["clusters"] = cfg.hubert.clusters
    return hf


def _get(hf: dict[str, Any], key: str, default: Any) -> Any:
    value = hf.get(key, default)
    return default if value is None else value


def hf_to_model_config(hf: dict[str, Any], *, for_pretraining: bool = True) -> ModelConfig:
    """A HF ``config.json`` dict -> ``ModelConfig``; refuses what our model cannot represent.

    ``model_type`` ``wav2vec2`` or ``wav2vec2-conformer`` (``models.hf_conformer`` lists
    what a conformer adds and what it cannot carry). Defaults follow Hugging Face's
    ``Wav2Vec2Config`` for absent keys. Without a
    ``"wavray"`` entry (a config not written by wavray), the settings HF has no field for
    come from the matching fairseq recipe: group-norm extractors get BASE's (gradient
    scale 0.1, temperature 2 -> 0.5, penalty 10), layer-norm extractors LV-60k's (1.0,
    2 -> 0.1, 0). For pretraining, HF's ``mask_time_*`` values of such configs are
    fine-tuning values (``mask_time_prob`` 0.05 by default), so the pretraining masking
    of SPEC.md (0.65, 10, 2) replaces them, with a warning.
    """
    model_type = hf.get("model_type", "wav2vec2")
    if model_type == hf_data2vec.MODEL_TYPE:
        return hf_data2vec.model_config_from_hf(hf, for_pretraining=for_pretraining)
    if model_type not in ("wav2vec2", hf_conformer.MODEL_TYPE, *hf_hubert.MODEL_TYPES):
        raise ValueError(
            f"config.json: model_type: expected 'wav2vec2', got {model_type!r}; "
            f"the other types read are {[hf_conformer.MODEL_TYPE, *hf_hubert.MODEL_TYPES, hf_data2vec.MODEL_TYPE]}"
        )
    conformer = model_type == hf_conformer.MODEL_TYPE
    hubert = model_type in hf_hubert.MODEL_TYPES
    problems: list[str] = []
    conformer_fields = hf_conformer.transformer_fields_from_hf(hf, problems) if conformer else {}
    if hubert:
        conformer_fields = hf_hubert.fields_from_hf(hf, problems)
    for key, expected in (
        ("feat_extract_activation", "gelu"), ("add_adapter", False), ("adapter_attn_dim", None),
        *([] if conformer else [("hidden_act", "gelu")]),
    ):
        if key in hf and hf[key] != expected and not (expected is False and hf[key] is None):
            problems.append(f"{key}: expected {expected!r}, got {hf[key]!r}")
    eps = hf.get("layer_norm_eps", 1e-5)
    if abs(float(eps) - 1e-5) > 1e-12:
        problems.append(f"layer_norm_eps: expected 1e-05, got {eps!r}")
    norm = _get(hf, "feat_extract_norm", "group")
    if norm not in ("group", "layer"):
        problems.append(f"feat_extract_norm: expected 'group' or 'layer', got {norm!r}")
    conv_dim = list(_get(hf, "conv_dim", (512,) * 7))
    conv_kernel = list(_get(hf, "conv_kernel", (10, 3, 3, 3, 3, 2, 2)))
    conv_stride = list(_get(hf, "conv_stride", (5, 2, 2, 2, 2, 2, 2)))
    if not (len(conv_dim) == len(conv_kernel) == len(conv_stride)):
        problems.append(
            f"conv_dim/conv_kernel/conv_stride: expected equal lengths, got "
            f"{len(conv_dim)}/{len(conv_kernel)}/{len(conv_stride)}"
        )
    if problems:
        raise ValueError("config.json: cannot represent this Hugging Face config: " + "; ".join(problems))

    extras = hf.get("wavray")
    layer_mode = norm == "layer"
    if not isinstance(extras, dict):
        extras = {
            "encoder_grad_mult": 1.0 if layer_mode else 0.1,
            "temperature_start": 2.0,
            "temperature_end": 0.1 if layer_mode else 0.5,
            "temperature_decay": 0.999995,
            "feature_penalty_weight": 0.0 if layer_mode else 10.0,
        }
        written_by_us = False
    else:
        written_by_us = True

    if for_pretraining and not written_by_us:
        hf_mask = (_get(hf, "mask_time_prob", 0.05), _get(hf, "mask_time_length", 10), _get(hf, "mask_time_min_masks", 2))
        mask = MaskConfig(prob=0.8) if model_type == hf_hubert.HUBERT else MaskConfig()
        if hf_mask != (mask.prob, mask.length, mask.min_masks):
            warnings.warn(
                f"config.json: mask_time_prob/length/min_masks {hf_mask} are Hugging Face fine-tuning "
                f"values; pretraining uses ({mask.prob}, {mask.length}, {mask.min_masks}) instead",
                stacklevel=2,
            )
    else:
        spec_augment = bool(_get(hf, "apply_spec_augment", True))
        mask = MaskConfig(
            prob=float(_get(hf, "mask_time_prob", 0.05)) if spec_augment else 0.0,
            length=int(_get(hf, "mask_time_length", 10)),
            min_masks=int(_get(hf, "mask_time_min_masks", 2)),
            channel_prob=float(_get(hf, "mask_feature_prob", 0.0)) if spec_augment else 0.0,
            channel_length=int(_get(hf, "mask_feature_length", 10)),
        )
    if int(_get(hf, "mask_feature_min_masks", 0)) != 0:
        warnings.warn("config.json: mask_feature_min_masks is ignored (channel masks use 0)", stacklevel=2)

    groups = int(_get(hf, "num_codevector_groups", 2))
    final_dim = int(_get(hf, "proj_codevector_dim", 256))
    codevector_dim = int(_get(hf, "codevector_dim", 256))
    return ModelConfig(
        objective="hubert" if hubert else "wav2vec2",
        hubert=HubertConfig(clusters=int(extras.get("clusters", hf_hubert.DEFAULT_CLUSTERS))) if hubert else HubertConfig(),
        encoder=FeatureEncoderConfig(
            conv_layers=[[int(c), int(k), int(s)] for c, k, s in zip(conv_dim, conv_kernel, conv_stride, strict=True)],
            mode="layer_norm" if layer_mode else "default",
            conv_bias=bool(_get(hf, "conv_bias", False)),
            grad_mult=float(extras.get("encoder_grad_mult", 0.1)),
        ),
        transformer=TransformerConfig(
            num_layers=int(_get(hf, "num_hidden_layers", 12)),
            dim=int(_get(hf, "hidden_size", 768)),
            ffn_dim=int(_get(hf, "intermediate_size", 3072)),
            num_heads=int(_get(hf, "num_attention_heads", 12)),
            # Hugging Face's conformer always closes its stack with the LayerNorm
            layer_norm_first=conformer or bool(_get(hf, "do_stable_layer_norm", False)),
            dropout=float(_get(hf, "hidden_dropout", 0.1)),
            attention_dropout=float(_get(hf, "attention_dropout", 0.1)),
            activation_dropout=float(_get(hf, "activation_dropout", 0.1)),
            layerdrop=float(_get(hf, "layerdrop", 0.1)),
            pos_conv_kernel=int(_get(hf, "num_conv_pos_embeddings", 128)),
            pos_conv_groups=int(_get(hf, "num_conv_pos_embedding_groups", 16)),
            **conformer_fields,
        ),
        mask=mask,
        quantizer=QuantizerConfig(
            groups=groups,
            entries=int(_get(hf, "num_codevectors_per_group", 320)),
            codevector_dim=0 if codevector_dim == final_dim else codevector_dim,  # 0: "same as final_dim"
            temperature=TemperatureConfig(
                start=float(extras.get("temperature_start", 2.0)),
                end=float(extras.get("temperature_end", 0.5)),
                decay=float(extras.get("temperature_decay", 0.999995)),
            ),
        ),
        loss=LossConfig(
            num_negatives=int(_get(hf, "num_negatives", 100)),
            logit_temp=float(_get(hf, "contrastive_logits_temperature", 0.1)),
            diversity_weight=float(_get(hf, "diversity_loss_weight", 0.1)),
            feature_penalty_weight=float(extras.get("feature_penalty_weight", 10.0)),
        ),
        final_dim=final_dim,
        dropout_input=float(_get(hf, "feat_proj_dropout", 0.0)),
        dropout_features=float(_get(hf, "feat_quantizer_dropout", 0.0)),
        final_dropout=float(_get(hf, "final_dropout", 0.1)),
    )


# --- files ----------------------------------------------------------------------------------


def _write_dir(out_dir: str | os.PathLike, config: dict[str, Any], state: dict[str, Tensor]) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {str(out)!r} exists and is not a directory")
    save_weights(state, out)
    (out / HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def write_preprocessor_config(out_dir: str | os.PathLike, *, normalize: bool, sample_rate: int = 16000) -> Path:
    """``preprocessor_config.json`` of a ``Wav2Vec2FeatureExtractor``: how the model's input is
    scaled (``do_normalize``: zero mean, unit variance per utterance, ``data.normalize``)."""
    path = Path(out_dir) / PREPROCESSOR_CONFIG
    path.write_text(json.dumps({
        "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": sample_rate,
        "padding_value": 0.0, "padding_side": "right", "do_normalize": normalize, "return_attention_mask": True,
    }, indent=2, sort_keys=True) + "\n")
    return path


def _unused_hf_weights(cfg: ModelConfig) -> dict[str, Tensor]:
    """What a HF directory of ``cfg`` needs beyond our weights (prefixed): the conformer's unrun modules."""
    if cfg.transformer.kind != "conformer":
        return {}
    return {hf_conformer.BASE_PREFIX + k: v for k, v in hf_conformer.unused_hf_weights(cfg).items()}


def save_hf_pretraining(
    model: Wav2Vec2ForPretraining, cfg: ModelConfig, out_dir: str | os.PathLike, *, normalize: bool = False
) -> Path:
    """Write ``model`` as a HF ``Wav2Vec2ForPreTraining`` directory (``Wav2Vec2ConformerForPreTraining``
    for a conformer): config.json, model.safetensors, preprocessor_config.json; ``normalize``:
    the run's ``data.normalize``."""
    if hf_hubert.family(cfg) is not None:
        raise ValueError(
            f"model.transformer.relative_bias={cfg.transformer.relative_bias!r}: Hugging Face has no WavLM "
            "pretraining class; export the encoder (WavLMModel) instead"
        )
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    config = model_config_to_hf(
        cfg, architecture=HF_PRETRAINING, temperature=float(model.quantizer.temperature.float().cpu())
    )
    out = _write_dir(out_dir, config, {**pretraining_state_to_hf(state), **_unused_hf_weights(cfg)})
    write_preprocessor_config(out, normalize=normalize)
    return out


def save_hf_encoder(
    encoder_state: dict[str, Tensor], cfg: ModelConfig, out_dir: str | os.PathLike, *, normalize: bool = False
) -> Path:
    """Write an encoder (our ``Wav2Vec2Encoder`` state dict, keys without ``encoder.``) as a HF
    ``Wav2Vec2Model`` (``Wav2Vec2ConformerModel`` for a conformer, ``HubertModel`` /
    ``WavLMModel`` for HuBERT / WavLM: ``models.hf_hubert``): what an objective whose heads
    Hugging Face has no class for (BEST-RQ, HuBERT) leaves for others to fine-tune."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in encoder_state.items()}
    conformer = cfg.transformer.kind == "conformer"
    config = model_config_to_hf(cfg, architecture="Wav2Vec2Model")
    unused = hf_conformer.unused_hf_weights(cfg) if conformer else {}
    out = _write_dir(out_dir, config, {**encoder_to_hf(state), **unused})
    write_preprocessor_config(out, normalize=normalize)
    return out


def save_hf_ctc(
    model: Wav2Vec2ForCTC, cfg: ModelConfig, out_dir: str | os.PathLike, *, pad_token_id: int = 0,
    normalize: bool = False,
) -> Path:
    """Write ``model`` as a HF ``Wav2Vec2ForCTC`` directory (``Wav2Vec2ConformerForCTC`` for a
    conformer); ``pad_token_id`` is the CTC blank, ``normalize`` the run's ``data.normalize``."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    config = model_config_to_hf(cfg, architecture=HF_CTC, vocab_size=model.vocab_size, pad_token_id=pad_token_id)
    kind = hf_hubert.family(cfg)
    prefix = hf_hubert.PREFIXES[kind] if kind else None
    out = _write_dir(out_dir, config, {**ctc_state_to_hf(state, prefix=prefix), **_unused_hf_weights(cfg)})
    write_preprocessor_config(out, normalize=normalize)
    return out


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a HF model directory, with a clear error if absent or invalid."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"Hugging Face directory {str(p)!r} does not exist or is not a directory")
    cfg_path = p / HF_CONFIG
    if not cfg_path.is_file():
        raise ValueError(f"Hugging Face directory {str(p)!r}: no {HF_CONFIG}")
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object at the top level")
    return data


def _load_weight_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def read_hf_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The weights of a HF model directory: safetensors preferred, sharded or not."""
    p = Path(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = p / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            state: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_load_weight_file(p / shard))
            return state
    for name in (WEIGHTS_NAME, "pytorch_model.bin"):
        if (p / name).is_file():
            return _load_weight_file(p / name)
    raise ValueError(
        f"Hugging Face directory {str(p)!r}: no model.safetensors or pytorch_model.bin (nor a sharded index)"
    )


def load_hf(
    path: str | os.PathLike, *, task: str = "pretraining"
) -> tuple[ModelConfig, Wav2Vec2ForPretraining | Wav2Vec2ForCTC]:
    """Read a HF ``Wav2Vec2ForPreTraining`` / ``Wav2Vec2Model`` / ``Wav2Vec2ForCTC`` directory,
    or one of their ``Wav2Vec2Conformer*`` counterparts (a ``model.transformer.kind``
    ``conformer`` model).

    ``task="pretraining"`` builds a ``Wav2Vec2ForPretraining`` (continued pretraining):
    heads absent from the directory (quantizer, projections) keep a fresh initialisation,
    with a warning; a CTC head is dropped. ``task="ctc"`` builds a ``Wav2Vec2ForCTC``
    (the directory must hold a CTC head).
    """
    if task not in ("pretraining", "ctc"):
        raise ValueError(f"task: expected 'pretraining' or 'ctc', got {task!r}")
    hf_cfg = read_hf_config(path)
    cfg = hf_to_model_config(hf_cfg, for_pretraining=task == "pretraining")
    hf_state = read_hf_state_dict(path)
    conformer_weights = is_conformer_state(hf_state)
    if conformer_weights != (cfg.transformer.kind == "conformer"):
        raise ValueError(
            f"Hugging Face directory {str(path)!r}: config.json has model_type "
            f"{hf_cfg.get('model_type', 'wav2vec2')!r} but the weights are "
            f"{'a conformer' if conformer_weights else 'a wav2vec 2.0 Transformer'}'s"
        )
    enc, heads, ctc = split_hf_state(hf_state)

    if task == "ctc":
        if not ctc:
            raise ValueError(f"Hugging Face directory {str(path)!r}: no lm_head weights; not a Wav2Vec2ForCTC model")
        model: Wav2Vec2ForPretraining | Wav2Vec2ForCTC = build_ctc_model(cfg, int(ctc["head.weight"].shape[0]))
        state = {**enc, **ctc}
    else:
        model = build_pretraining_model(cfg)
        state = {**enc, **heads}
        if ctc:
            warnings.warn(f"{path}: the CTC head (lm_head) is not part of the pretraining model; dropped", stacklevel=2)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state and k not in _OURS_ONLY)
    unexpected = sorted(k for k in state if k not in expected)
    if unexpected:
        raise ValueError(f"Hugging Face directory {str(path)!r}: weights our model has no place for: {unexpected}")
    check_shapes(state, expected, f"Hugging Face directory {str(path)!r} (shapes from its {HF_CONFIG})")
    if missing:
        fresh_heads = [k for k in missing if not k.startswith("encoder.")]
        fresh_other = [k for k in missing if k.startswith("encoder.")]
        if fresh_other and fresh_other != ["encoder.mask_embedding.weight"]:
            raise ValueError(f"Hugging Face directory {str(path)!r}: encoder weights missing: {fresh_other}")
        warnings.warn(
            f"{path}: no weights for {fresh_heads + fresh_other}; freshly initialised "
            "(e.g. a Wav2Vec2Model or Wav2Vec2ForCTC directory has no quantizer)",
            stacklevel=2,
        )
    model.load_state_dict(state, strict=False)
    if any(k.startswith("teacher.") for k in missing) and hasattr(model, "reset_teacher"):
        model.reset_teacher()  # data2vec: the teacher starts as the imported encoder
    if isinstance(model, Wav2Vec2ForPretraining):
        current = hf_cfg.get("wavray", {}).get("temperature") if isinstance(hf_cfg.get("wavray"), dict) else None
        if current is not None:
            with torch.no_grad():
                model.quantizer.temperature.fill_(float(current))
    return cfg, model
