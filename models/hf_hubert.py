"""What Hugging Face's HuBERT and WavLM add to the wav2vec 2.0 interop of ``models.hf``.

``models.hf`` reads and writes the directories and dispatches on ``model_type``; this
module holds only the HuBERT/WavLM side: class names, the base model's prefix, the
extra weight names of WavLM's gated relative position bias, the config fields, and the
checks of what our encoder can and cannot represent.

Which family a model exports to: a ``transformer.relative_bias='gated'`` encoder is
WavLM's (``WavLMModel`` / ``WavLMForCTC``), any other encoder pretrained with
``model.objective=hubert`` is HuBERT's (``HubertModel`` / ``HubertForCTC``). Their
encoders are wav2vec 2.0's (the same feature encoder, projection, conv positional
embedding and layers), so the weights map as wav2vec 2.0's do, under ``hubert.`` /
``wavlm.`` in the CTC classes.

What does not map:

- HuBERT's prediction head (``final_proj`` and the cluster embeddings, our
  ``prediction_head``): Hugging Face has no HuBERT pretraining class, so an export is
  the encoder (or the CTC model) alone, and an import of ``HubertModel`` / ``WavLMModel``
  starts the head fresh (``model.hubert.clusters`` from the ``wavray`` entry of a
  directory we wrote, else 500, HuBERT BASE's second iteration);
- ``feat_proj_layer_norm=False`` (no LayerNorm before the projection) and
  ``conv_pos_batch_norm=True``: ours always normalises the features and has no
  BatchNorm in the positional convolution (``ValueError`` naming them);
- a conformer with WavLM's bias (refused by the config: the conformer has its own
  relative positions).

WavLM keeps its bias table in layer 0 (``rel_attn_embed``); ours belongs to the stack
(``transformer.relative_embedding``), so that LayerDrop of the first layer leaves the
others their bias: the tensors are the same, only the name moves.
"""

from __future__ import annotations

from typing import Any

from models.config import ModelConfig

HUBERT = "hubert"
WAVLM = "wavlm"
MODEL_TYPES = (HUBERT, WAVLM)
PREFIXES = {HUBERT: "hubert.", WAVLM: "wavlm."}
DEFAULT_CLUSTERS = 500

# Our key (relative to the encoder) <-> HF key (relative to the base model): WavLM's gate
# and bias table, in models.hf's (pattern, template) form.
GATED_TO_HF: list[tuple[str, str]] = [
    (r"transformer\.layers\.(\d+)\.attention\.gate\.linear\.(weight|bias)",
     r"encoder.layers.\1.attention.gru_rel_pos_linear.\2"),
    (r"transformer\.layers\.(\d+)\.attention\.gate\.const", r"encoder.layers.\1.attention.gru_rel_pos_const"),
    (r"transformer\.relative_embedding\.weight", r"encoder.layers.0.attention.rel_attn_embed.weight"),
]
GATED_FROM_HF: list[tuple[str, str]] = [
    (r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_linear\.(weight|bias)",
     r"transformer.layers.\1.attention.gate.linear.\2"),
    (r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_const", r"transformer.layers.\1.attention.gate.const"),
    (r"encoder\.layers\.0\.attention\.rel_attn_embed\.weight", r"transformer.relative_embedding.weight"),
]
# Our keys of a gated encoder, any prefix.
OUR_GATED_KEY = r"(.*\.)?transformer\.relative_embedding\.weight"
HF_GATED_KEY = r"(.*\.)?encoder\.layers\.0\.attention\.rel_attn_embed\.weight"


def family(cfg: ModelConfig) -> str | None:
    """``wavlm``, ``hubert`` or None (wav2vec 2.0's classes, a conformer's too): where ``cfg``'s
    encoder exports to."""
    if cfg.transformer.kind == "conformer":
        return None
    if cfg.transformer.relative_bias == "gated":
        return WAVLM
    if cfg.objective == "hubert":
        return HUBERT
    return None


def architecture_name(kind: str, wav2vec2_name: str) -> str:
    """``Wav2Vec2ForCTC`` -> ``HubertForCTC`` / ``WavLMForCTC``; ``Wav2Vec2Model`` -> ``HubertModel`` ..."""
    stem = {HUBERT: "Hubert", WAVLM: "WavLM"}[kind]
    return wav2vec2_name.replace("Wav2Vec2", stem, 1)


def config_to_hf(cfg: ModelConfig, kind: str) -> dict[str, Any]:
    """The ``config.json`` entries of a ``HubertConfig`` / ``WavLMConfig`` beyond wav2vec 2.0's."""
    out: dict[str, Any] = {"model_type": kind}
    if kind == HUBERT:
        out.update({"feat_proj_layer_norm": True, "conv_pos_batch_norm": False})
    else:
        out.update({"num_buckets": cfg.transformer.relative_buckets,
                    "max_bucket_distance": cfg.transformer.relative_max_distance})
    return out


def fields_from_hf(hf: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """(``TransformerConfig`` fields of a HuBERT / WavLM config beyond wav2vec 2.0's); appends
    what cannot be represented to ``problems`` (the caller raises)."""
    kind = hf.get("model_type")
    if kind == HUBERT:
        if hf.get("feat_proj_layer_norm", True) is False:
            problems.append("feat_proj_layer_norm: expected true (our projection always normalises the features)")
        if hf.get("conv_pos_batch_norm", False):
            problems.append("conv_pos_batch_norm: expected false (our positional convolution has no BatchNorm)")
        return {}
    return {
        "relative_bias": "gated",
        "relative_buckets": int(hf.get("num_buckets") or 320),
        "relative_max_distance": int(hf.get("max_bucket_distance") or 800),
    }
