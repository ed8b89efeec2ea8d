"""What Hugging Face's Wav2Vec2-Conformer adds to the wav2vec 2.0 interop of ``models.hf``.

``models.hf`` reads and writes the directories and dispatches on ``model_type``; this
module holds only the conformer's side: its class names, weight names, config fields,
and the checks of what our ``ConformerEncoder`` can and cannot represent.

What does not map (``ValueError`` naming it):

- ``layer_norm_first=False`` (fairseq's BASE layout, the stack's LayerNorm before the
  first layer): Hugging Face's conformer encoder always closes with a LayerNorm after
  the last layer and has no switch (its ``do_stable_layer_norm`` is not read).
- ``hidden_act`` other than swish/SiLU: Hugging Face applies one activation to both the
  feed-forward and the convolution modules; ours is SiLU in both (fairseq's).
- ``position_embeddings_type`` None (a conformer without positions) or a rotary base
  other than 10000.

What is dropped or filled:

- Hugging Face builds a conv positional embedding (``encoder.pos_conv_embed``) that its
  conformer never runs; exports write it as zero weights (weight-norm gain 0, so it
  would add nothing if run), sized by ``pos_conv_kernel`` / ``pos_conv_groups``, and
  imports drop it. Rotary exports write the frequency buffer ``inv_freq`` Hugging Face
  keeps in the state dict; imports drop it (the frequencies follow from the config).
- ``conformer_conv_dropout``: ours is ``model.transformer.dropout``; a different value
  in a Hugging Face config is replaced, with a warning (it only matters in training).
- ``max_source_positions`` sizes Hugging Face's precomputed sinusoid table, not its
  values; ours are computed for each length, so it is written as Hugging Face's default
  and ignored on import.
- BatchNorm running statistics (``running_mean``, ``running_var``,
  ``num_batches_tracked``) are ordinary buffers of ours too and map as they are.

Padding: ours keeps padded frames out of the convolution module (see
``models.conformer``); Hugging Face's does not, so a padded batch agrees with Hugging
Face only utterance by utterance (unpadded utterances, or each one alone).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from models.config import ModelConfig, TransformerConfig
from models.conformer import ROTARY_BASE, rotary_inv_freq

MODEL_TYPE = "wav2vec2-conformer"
BASE_PREFIX = "wav2vec2_conformer."
HF_PRETRAINING = "Wav2Vec2ConformerForPreTraining"
HF_CTC = "Wav2Vec2ConformerForCTC"
HIDDEN_ACT = "swish"
_SILU_NAMES = ("swish", "silu")
_POSITION_TYPES = ("relative", "rotary")

# Our key (relative to ``encoder.transformer.layers.N.``) <-> HF key (relative to
# ``encoder.layers.N.``); both directions are built from this one table.
_LAYER_NAMES: list[tuple[str, str]] = [
    ("ffn1_norm", "ffn1_layer_norm"),
    ("ffn1.fc1", "ffn1.intermediate_dense"),
    ("ffn1.fc2", "ffn1.output_dense"),
    ("attn_norm", "self_attn_layer_norm"),
    ("attention.q_proj", "self_attn.linear_q"),
    ("attention.k_proj", "self_attn.linear_k"),
    ("attention.v_proj", "self_attn.linear_v"),
    ("attention.out_proj", "self_attn.linear_out"),
    ("attention.linear_pos", "self_attn.linear_pos"),
    ("conv.norm", "conv_module.layer_norm"),
    ("conv.pointwise1", "conv_module.pointwise_conv1"),
    ("conv.depthwise", "conv_module.depthwise_conv"),
    ("conv.batch_norm", "conv_module.batch_norm"),
    ("conv.pointwise2", "conv_module.pointwise_conv2"),
    ("ffn2_norm", "ffn2_layer_norm"),
    ("ffn2.fc1", "ffn2.intermediate_dense"),
    ("ffn2.fc2", "ffn2.output_dense"),
    ("final_norm", "final_layer_norm"),
]
_LEAVES = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def _escape(name: str) -> str:
    return name.replace(".", r"\.")


# Rules in ``models.hf``'s (pattern, template) form, for the layers only; the feature
# encoder, projection, mask embedding and the stack's LayerNorm share wav2vec 2.0's.
LAYERS_TO_HF: list[tuple[str, str]] = [
    (rf"transformer\.layers\.(\d+)\.{_escape(ours)}\.{_LEAVES}", rf"encoder.layers.\1.{hf}.\2")
    for ours, hf in _LAYER_NAMES
] + [(r"transformer\.layers\.(\d+)\.attention\.(pos_bias_[uv])", r"encoder.layers.\1.self_attn.\2")]
LAYERS_FROM_HF: list[tuple[str, str]] = [
    (rf"encoder\.layers\.(\d+)\.{_escape(hf)}\.{_LEAVES}", rf"transformer.layers.\1.{ours}.\2")
    for ours, hf in _LAYER_NAMES
] + [(r"encoder\.layers\.(\d+)\.self_attn\.(pos_bias_[uv])", r"transformer.layers.\1.attention.\2")]
# HF keys (relative to the base model) of modules Hugging Face's conformer never runs.
HF_UNUSED = r"encoder\.pos_conv_embed\..*|encoder\.embed_positions\.inv_freq"
# A conformer's weights, ours or Hugging Face's (keys relative to the model, any prefix).
OUR_LAYER_KEY = r"(.*\.)?transformer\.layers\.\d+\.conv\.depthwise\.weight"
HF_LAYER_KEY = r"(.*\.)?encoder\.layers\.\d+\.conv_module\.depthwise_conv\.weight"


def architecture_name(wav2vec2_name: str) -> str:
    """The conformer class of a wav2vec 2.0 class name (``Wav2Vec2ForCTC`` -> ``Wav2Vec2ConformerForCTC``)."""
    return wav2vec2_name.replace("Wav2Vec2", "Wav2Vec2Conformer", 1)


def unused_hf_weights(cfg: ModelConfig) -> dict[str, Tensor]:
    """The tensors Hugging Face's conformer holds but never runs, keyed relative to its base model.

    Written so that ``from_pretrained`` finds every weight it expects; the positional
    convolution's gain is 0, so its weight is 0 and it would add nothing if run.
    """
    tr = cfg.transformer
    out = {
        "encoder.pos_conv_embed.conv.parametrizations.weight.original0": torch.zeros(1, 1, tr.pos_conv_kernel),
        "encoder.pos_conv_embed.conv.parametrizations.weight.original1": torch.ones(
            tr.dim, tr.dim // tr.pos_conv_groups, tr.pos_conv_kernel
        ),
        "encoder.pos_conv_embed.conv.bias": torch.zeros(tr.dim),
    }
    if tr.position == "rotary":
        out["encoder.embed_positions.inv_freq"] = rotary_inv_freq(tr.dim // tr.num_heads)
    return out


def config_to_hf(tr: TransformerConfig) -> dict[str, Any]:
    """The ``config.json`` entries of a ``Wav2Vec2ConformerConfig`` that differ from wav2vec 2.0's."""
    if not tr.layer_norm_first:
        raise ValueError(
            "model.transformer.layer_norm_first=False (the conformer stack's LayerNorm before the first "
            "layer, fairseq's BASE layout) has no Hugging Face Wav2Vec2-Conformer equivalent: its encoder "
            "always applies the LayerNorm after the last layer; export a layer_norm_first=True model"
        )
    return {
        "model_type": MODEL_TYPE,
        "hidden_act": HIDDEN_ACT,
        "position_embeddings_type": tr.position,
        "rotary_embedding_base": int(ROTARY_BASE),
        "max_source_positions": 5000,
        "conv_depthwise_kernel_size": tr.conv_kernel,
        "conformer_conv_dropout": tr.dropout,
    }


def transformer_fields_from_hf(hf: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The ``TransformerConfig`` fields of a conformer's ``config.json`` beyond wav2vec 2.0's.

    Appends what cannot be represented to ``problems`` (the caller raises).
    """
    act = hf.get("hidden_act", "gelu")  # Hugging Face's default
    if act not in _SILU_NAMES:
        problems.append(
            f"hidden_act: expected 'swish' or 'silu' (our conformer's feed-forward and convolution "
            f"modules use SiLU), got {act!r}"
        )
    position = hf.get("position_embeddings_type", "relative")
    if position not in _POSITION_TYPES:
        problems.append(
            f"position_embeddings_type: expected 'relative' or 'rotary', got {position!r} "
            "(a conformer without position information)"
        )
    base = hf.get("rotary_embedding_base", ROTARY_BASE)
    if position == "rotary" and float(base) != ROTARY_BASE:
        problems.append(f"rotary_embedding_base: expected {int(ROTARY_BASE)}, got {base!r}")
    hidden_dropout = hf.get("hidden_dropout", 0.1)
    conv_dropout = hf.get("conformer_conv_dropout", 0.1)
    if conv_dropout is not None and hidden_dropout is not None and float(conv_dropout) != float(hidden_dropout):
        warnings.warn(
            f"config.json: conformer_conv_dropout {conv_dropout} is replaced by hidden_dropout {hidden_dropout} "
            "(model.transformer.dropout is also the convolution module's dropout)",
            stacklevel=3,
        )
    return {
        "kind": "conformer",
        "conv_kernel": int(hf.get("conv_depthwise_kernel_size") or 31),
        "position": position if position in _POSITION_TYPES else "relative",
    }
