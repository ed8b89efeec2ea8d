"""Builds the models from ``ModelConfig``: the only reader of the model config."""

from __future__ import annotations

from models.config import ModelConfig
from models.conformer import ConformerEncoder
from models.feature_encoder import FeatureEncoder, FeatureProjection
from models.quantizer import GumbelVectorQuantizer
from models.transformer import TransformerEncoder
from models.wav2vec2 import Wav2Vec2Encoder, Wav2Vec2ForCTC, Wav2Vec2ForPretraining


def build_encoder(cfg: ModelConfig) -> Wav2Vec2Encoder:
    """Feature encoder + projection + mask embedding + context network (Transformer or Conformer)."""
    enc = cfg.encoder
    tr = cfg.transformer
    feature_encoder = FeatureEncoder(enc.conv_layers, mode=enc.mode, conv_bias=enc.conv_bias)
    projection = FeatureProjection(enc.dim, tr.dim, cfg.dropout_input)
    common = dict(
        dim=tr.dim, ffn_dim=tr.ffn_dim, num_layers=tr.num_layers, num_heads=tr.num_heads,
        dropout=tr.dropout, attention_dropout=tr.attention_dropout,
        activation_dropout=tr.activation_dropout, layerdrop=tr.layerdrop,
        layer_norm_first=tr.layer_norm_first,
    )
    transformer: TransformerEncoder | ConformerEncoder
    if tr.kind == "conformer":
        transformer = ConformerEncoder(**common, conv_kernel=tr.conv_kernel, position=tr.position)
    else:
        transformer = TransformerEncoder(
            **common, pos_conv_kernel=tr.pos_conv_kernel, pos_conv_groups=tr.pos_conv_groups
        )
    return Wav2Vec2Encoder(feature_encoder, projection, transformer, grad_mult=enc.grad_mult)


def build_pretraining_model(cfg: ModelConfig) -> Wav2Vec2ForPretraining:
    """The self-supervised model of ``cfg`` with fresh weights (fairseq's initialisation)."""
    encoder = build_encoder(cfg)
    q = cfg.quantizer
    quantizer = GumbelVectorQuantizer(
        cfg.encoder.dim, groups=q.groups, entries=q.entries, codevector_dim=cfg.codevector_dim,
        temperature=(q.temperature.start, q.temperature.end, q.temperature.decay),
    )
    return Wav2Vec2ForPretraining(
        encoder, quantizer, final_dim=cfg.final_dim, dropout_features=cfg.dropout_features,
        mask_prob=cfg.mask.prob, mask_length=cfg.mask.length, min_masks=cfg.mask.min_masks,
        num_negatives=cfg.loss.num_negatives, logit_temp=cfg.loss.logit_temp,
        diversity_weight=cfg.loss.diversity_weight, feature_penalty_weight=cfg.loss.feature_penalty_weight,
    )


def build_ctc_model(cfg: ModelConfig, vocab_size: int) -> Wav2Vec2ForCTC:
    """The fine-tuning model of ``cfg`` with a ``vocab_size``-way head (blank included).

    Load pretrained encoder weights with ``model.load_encoder_state_dict(state_dict)``.
    """
    return Wav2Vec2ForCTC(
        build_encoder(cfg), vocab_size, final_dropout=cfg.final_dropout,
        mask_prob=cfg.mask.prob, mask_length=cfg.mask.length, min_masks=cfg.mask.min_masks,
        channel_prob=cfg.mask.channel_prob, channel_length=cfg.mask.channel_length,
    )


def count_parameters(model) -> int:  # noqa: ANN001 - any nn.Module
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
