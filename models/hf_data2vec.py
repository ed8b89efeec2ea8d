"""What Hugging Face's ``Data2VecAudio`` adds to the wav2vec 2.0 interop of ``models.hf``.

``models.hf`` reads and writes the directories and dispatches on ``model_type``
(``data2vec-audio``) and on the weights' own keys; this module holds the data2vec side:
class names, the positional embedding's weight names, the config fields, and the checks
of what maps.

``Data2VecAudioModel`` is wav2vec 2.0's encoder with data2vec's positional embedding: a
stack of ``num_conv_pos_embeddings`` plain convolutions of ``conv_pos_kernel_size``
(ours: ``model.transformer.pos_conv_depth`` x ``pos_conv_kernel``, each with a
non-affine LayerNorm and GELU), a layer-norm conv extractor, post-LN layers. Its weight
names are wav2vec 2.0's except ``encoder.pos_conv_embed.layers.N.conv``.

What maps: a data2vec 1.0 model's encoder, both ways (and a fine-tuned one as
``Data2VecAudioForCTC``); the config's settings Hugging Face has no field for (the
objective's section, the extractor's gradient scale) travel in a ``"wavray"`` entry.

What does not (``ValueError`` naming it):

- the EMA teacher and the regression head: the export is the student's encoder
  (``Data2VecAudioModel``), as fairseq's own conversion; an import starts the teacher as
  a copy of the imported encoder and the head fresh. There is no
  ``Data2VecAudioForPreTraining``.
- data2vec 2.0's ALiBi attention bias and its conv decoder: no Hugging Face class
  runs them (a ``Data2VecAudioModel`` without the bias would compute something else), so
  a data2vec 2.0 model stays a wavray checkpoint.
- a group-norm extractor (``Data2VecAudio`` always has a LayerNorm after every conv),
  pre-LN layers, a single weight-normed positional convolution (wav2vec 2.0's), a
  conformer.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

from models.config import (
    Data2VecConfig,
    FeatureEncoderConfig,
    MaskConfig,
    ModelConfig,
    TransformerConfig,
)
from models.config import data2vec as data2vec_preset

MODEL_TYPE = "data2vec-audio"
BASE_PREFIX = "data2vec_audio."
HF_MODEL = "Data2VecAudioModel"
HF_CTC = "Data2VecAudioForCTC"

# Rules in ``models.hf``'s (pattern, template) form, keys relative to the encoder / base model.
POS_CONV_TO_HF: list[tuple[str, str]] = [
    (r"transformer\.pos_conv\.layers\.(\d+)\.conv\.(weight|bias)", r"encoder.pos_conv_embed.layers.\1.conv.\2"),
]
POS_CONV_FROM_HF: list[tuple[str, str]] = [
    (r"encoder\.pos_conv_embed\.layers\.(\d+)\.conv\.(weight|bias)", r"transformer.pos_conv.layers.\1.conv.\2"),
]
_OUR_POS_KEY = re.compile(r"(.*\.)?transformer\.pos_conv\.layers\.\d+\.conv\.weight")
_HF_POS_KEY = re.compile(r"(.*\.)?encoder\.pos_conv_embed\.layers\.\d+\.conv\.weight")


def is_data2vec_state(state: dict[str, Any]) -> bool:
    """Whether a state dict, ours or Hugging Face's (any prefix), has data2vec's stacked
    positional embedding."""
    return any(_OUR_POS_KEY.fullmatch(k) or _HF_POS_KEY.fullmatch(k) for k in state)


def maps(cfg: ModelConfig) -> bool:
    """Whether ``cfg``'s encoder has a Hugging Face class here (``Data2VecAudioModel``)."""
    return not problems(cfg)


def problems(cfg: ModelConfig) -> list[str]:
    """Why ``cfg``'s encoder is no ``Data2VecAudioModel`` (empty when it is one)."""
    tr, out = cfg.transformer, []
    if tr.alibi:
        out.append("model.transformer.alibi: data2vec 2.0's ALiBi attention bias has no Hugging Face class")
    if tr.kind != "transformer":
        out.append(f"model.transformer.kind {tr.kind!r}: Data2VecAudio is a Transformer")
    if tr.layer_norm_first:
        out.append("model.transformer.layer_norm_first: Data2VecAudio's layers are post-LN only")
    if tr.relative_bias != "none":
        out.append(f"model.transformer.relative_bias {tr.relative_bias!r}: Data2VecAudio has no relative position bias")
    if tr.pos_conv_depth < 2:
        out.append("model.transformer.pos_conv_depth 1 is wav2vec 2.0's weight-normed convolution, not "
                   "Data2VecAudio's stack")
    if cfg.encoder.mode != "layer_norm":
        out.append(f"model.encoder.mode {cfg.encoder.mode!r}: Data2VecAudio has a LayerNorm after every conv")
    return out


def architecture_name(wav2vec2_name: str) -> str:
    """``Wav2Vec2Model`` -> ``Data2VecAudioModel``, ``Wav2Vec2ForCTC`` -> ``Data2VecAudioForCTC``;
    ``ValueError`` for a pretraining class (Hugging Face has none for data2vec)."""
    names = {"Wav2Vec2Model": HF_MODEL, "Wav2Vec2ForCTC": HF_CTC}
    if wav2vec2_name not in names:
        raise ValueError(
            f"{wav2vec2_name}: Hugging Face has no data2vec class for it (its teacher and regression head have "
            f"no Hugging Face home); the encoder exports as {HF_MODEL}"
        )
    return names[wav2vec2_name]


def config_to_hf(
    cfg: ModelConfig, *, architecture: str, vocab_size: int | None = None, pad_token_id: int = 0
) -> dict[str, Any]:
    """``ModelConfig`` -> the ``config.json`` dict of a ``Data2VecAudioConfig``; ``architecture``
    is the wav2vec 2.0 class name (``Wav2Vec2Model``, ``Wav2Vec2ForCTC``)."""
    found = problems(cfg)
    if found:
        raise ValueError("no Hugging Face Data2VecAudio class for this model: " + "; ".join(found))
    enc, tr, mask = cfg.encoder, cfg.transformer, cfg.mask
    hf: dict[str, Any] = {
        "model_type": MODEL_TYPE,
        "architectures": [architecture_name(architecture)],
        "conv_dim": [int(c) for c, _, _ in enc.conv_layers],
        "conv_kernel": [int(k) for _, k, _ in enc.conv_layers],
        "conv_stride": [int(s) for _, _, s in enc.conv_layers],
        "num_feat_extract_layers": len(enc.conv_layers),
        "conv_bias": enc.conv_bias,
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
        "num_conv_pos_embeddings": tr.pos_conv_depth,
        "conv_pos_kernel_size": tr.pos_conv_kernel,
        "num_conv_pos_embedding_groups": tr.pos_conv_groups,
        "layer_norm_eps": 1e-5,
        "feat_proj_dropout": cfg.dropout_input,
        "final_dropout": cfg.final_dropout,
        "apply_spec_augment": True,
        "mask_time_prob": mask.prob,
        "mask_time_length": mask.length,
        "mask_time_min_masks": mask.min_masks,
        "mask_feature_prob": mask.channel_prob,
        "mask_feature_length": mask.channel_length,
        "mask_feature_min_masks": 0,
        "add_adapter": False,
        "use_weighted_layer_sum": False,
        "pad_token_id": pad_token_id,
        "ctc_loss_reduction": "sum",
        "ctc_zero_infinity": True,
        "wavray": {
            "objective": cfg.objective,
            "encoder_grad_mult": enc.grad_mult,
            "data2vec": dataclasses.asdict(cfg.data2vec),
        },
    }
    if vocab_size is not None:
        hf["vocab_size"] = vocab_size
    return hf


def model_config_from_hf(hf: dict[str, Any], *, for_pretraining: bool = True) -> ModelConfig:
    """A ``Data2VecAudioConfig`` ``config.json`` dict -> a data2vec 1.0 ``ModelConfig``.

    Absent keys take Hugging Face's defaults. Without a ``"wavray"`` entry the objective's
    settings are the data2vec BASE recipe's (``models.config.data2vec``), and for
    pretraining its masking replaces Hugging Face's fine-tuning values, with a warning.
    """

    def get(key: str, default: Any) -> Any:
        value = hf.get(key, default)
        return default if value is None else value

    found = []
    for key, expected in (("feat_extract_activation", "gelu"), ("hidden_act", "gelu"), ("add_adapter", False)):
        if key in hf and hf[key] != expected and not (expected is False and hf[key] is None):
            found.append(f"{key}: expected {expected!r}, got {hf[key]!r}")
    if abs(float(get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
        found.append(f"layer_norm_eps: expected 1e-05, got {hf.get('layer_norm_eps')!r}")
    depth = int(get("num_conv_pos_embeddings", 5))
    if depth < 2:
        found.append(f"num_conv_pos_embeddings: expected >= 2 (ours: a stack), got {depth}")
    conv_dim = list(get("conv_dim", (512,) * 7))
    conv_kernel = list(get("conv_kernel", (10, 3, 3, 3, 3, 2, 2)))
    conv_stride = list(get("conv_stride", (5, 2, 2, 2, 2, 2, 2)))
    if not len(conv_dim) == len(conv_kernel) == len(conv_stride):
        found.append(f"conv_dim/conv_kernel/conv_stride: expected equal lengths, got "
                     f"{len(conv_dim)}/{len(conv_kernel)}/{len(conv_stride)}")
    if found:
        raise ValueError("config.json: cannot represent this Hugging Face Data2VecAudio config: " + "; ".join(found))

    recipe = data2vec_preset()
    extras = hf.get("wavray")
    if isinstance(extras, dict):
        section = Data2VecConfig(**extras.get("data2vec", {}))
        grad_mult = float(extras.get("encoder_grad_mult", 1.0))
        hf_mask = None
    else:
        section, grad_mult = recipe.data2vec, recipe.encoder.grad_mult
        hf_mask = (get("mask_time_prob", 0.05), get("mask_time_length", 10), get("mask_time_min_masks", 2))
    if for_pretraining and hf_mask is not None:
        mask = recipe.mask
        if hf_mask != (mask.prob, mask.length, mask.min_masks):
            warnings.warn(
                f"config.json: mask_time_prob/length/min_masks {hf_mask} are Hugging Face fine-tuning values; "
                f"pretraining uses data2vec's ({mask.prob}, {mask.length}, {mask.min_masks}) instead",
                stacklevel=3,
            )
    else:
        spec_augment = bool(get("apply_spec_augment", True))
        mask = MaskConfig(
            prob=float(get("mask_time_prob", 0.05)) if spec_augment else 0.0,
            length=int(get("mask_time_length", 10)),
            min_masks=int(get("mask_time_min_masks", 2)),
            channel_prob=float(get("mask_feature_prob", 0.0)) if spec_augment else 0.0,
            channel_length=int(get("mask_feature_length", 10)),
        )
    num_layers = int(get("num_hidden_layers", 12))
    section.top_k = min(section.top_k, num_layers)
    return ModelConfig(
        objective="data2vec",
        encoder=FeatureEncoderConfig(
            conv_layers=[[int(c), int(k), int(s)] for c, k, s in zip(conv_dim, conv_kernel, conv_stride, strict=True)],
            mode="layer_norm", conv_bias=bool(get("conv_bias", False)), grad_mult=grad_mult,
        ),
        transformer=TransformerConfig(
            num_layers=num_layers,
            dim=int(get("hidden_size", 768)),
            ffn_dim=int(get("intermediate_size", 3072)),
            num_heads=int(get("num_attention_heads", 12)),
            layer_norm_first=False,
            dropout=float(get("hidden_dropout", 0.1)),
            attention_dropout=float(get("attention_dropout", 0.1)),
            activation_dropout=float(get("activation_dropout", 0.1)),
            layerdrop=float(get("layerdrop", 0.1)),
            pos_conv_kernel=int(get("conv_pos_kernel_size", 19)),
            pos_conv_groups=int(get("num_conv_pos_embedding_groups", 16)),
            pos_conv_depth=depth,
        ),
        mask=mask,
        data2vec=section,
        dropout_input=float(get("feat_proj_dropout", 0.0)),
        dropout_features=0.0,
        final_dropout=float(get("final_dropout", 0.1)),
    )
