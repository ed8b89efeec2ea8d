"""Builds the models from ``ModelConfig``: the only reader of the model config."""

from __future__ import annotations

from models.best_rq import RandomProjectionQuantizer
from models.config import TARGET_HOP, ModelConfig
from models.conformer import ConformerEncoder
from models.data2vec import ConvDecoder, Data2Vec2Model, Data2VecModel
from models.feature_encoder import FeatureEncoder, FeatureProjection
from models.frontends import LogMelFrontend
from models.masked_prediction import MaskedPredictionModel
from models.quantizer import GumbelVectorQuantizer
from models.transformer import TransformerEncoder
from models.wav2vec2 import Wav2Vec2Encoder, Wav2Vec2ForCTC, Wav2Vec2ForPretraining


def build_frontend(cfg: ModelConfig) -> FeatureEncoder | LogMelFrontend:
    """The conv feature encoder (``model.encoder``) or log-mel filterbanks (``model.frontend``)."""
    if cfg.frontend.kind == "logmel":
        fe = cfg.frontend
        return LogMelFrontend(fe.n_mels, win_length=fe.window, hop_length=fe.hop, stack=fe.stack,
                              normalize=fe.normalize)
    enc = cfg.encoder
    return FeatureEncoder(enc.conv_layers, mode=enc.mode, conv_bias=enc.conv_bias)


def build_encoder(cfg: ModelConfig) -> Wav2Vec2Encoder:
    """Front end + projection + mask embedding + context network (Transformer or Conformer)."""
    tr = cfg.transformer
    feature_encoder = build_frontend(cfg)
    projection = FeatureProjection(cfg.frontend_dim, tr.dim, cfg.dropout_input)
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
            **common, pos_conv_kernel=tr.pos_conv_kernel, pos_conv_groups=tr.pos_conv_groups,
            pos_conv_depth=tr.pos_conv_depth, alibi=tr.alibi,
        )
    # The log-mel front end has no weights: nothing to scale the gradient of.
    grad_mult = cfg.encoder.grad_mult if cfg.frontend.kind == "conv" else 1.0
    return Wav2Vec2Encoder(feature_encoder, projection, transformer, grad_mult=grad_mult)


def build_pretraining_model(
    cfg: ModelConfig,
) -> Wav2Vec2ForPretraining | MaskedPredictionModel | Data2VecModel | Data2Vec2Model:
    """The self-supervised model of ``cfg``'s objective with fresh weights."""
    if cfg.objective == "best_rq":
        return build_best_rq_model(cfg)
    if cfg.objective in ("data2vec", "data2vec2"):
        return build_data2vec_model(cfg)
    return build_wav2vec2_model(cfg)


def build_wav2vec2_model(cfg: ModelConfig) -> Wav2Vec2ForPretraining:
    """wav2vec 2.0's contrastive model (fairseq's initialisation)."""
    encoder = build_encoder(cfg)
    q = cfg.quantizer
    quantizer = GumbelVectorQuantizer(
        cfg.frontend_dim, groups=q.groups, entries=q.entries, codevector_dim=cfg.codevector_dim,
        temperature=(q.temperature.start, q.temperature.end, q.temperature.decay),
    )
    return Wav2Vec2ForPretraining(
        encoder, quantizer, final_dim=cfg.final_dim, dropout_features=cfg.dropout_features,
        mask_prob=cfg.mask.prob, mask_length=cfg.mask.length, min_masks=cfg.mask.min_masks,
        num_negatives=cfg.loss.num_negatives, logit_temp=cfg.loss.logit_temp,
        diversity_weight=cfg.loss.diversity_weight, feature_penalty_weight=cfg.loss.feature_penalty_weight,
    )


def build_best_rq_model(cfg: ModelConfig) -> MaskedPredictionModel:
    """BEST-RQ: masked prediction of a frozen random-projection quantizer's ids of each
    frame's normalised log-mel features (10 ms frames stacked to the model's frame rate)."""
    b = cfg.best_rq
    encoder = build_encoder(cfg)
    stack = cfg.frame_stride // TARGET_HOP
    target_features = LogMelFrontend(b.n_mels, hop_length=TARGET_HOP, stack=stack, normalize=True)
    quantizer = RandomProjectionQuantizer(
        target_features.dim, codebooks=b.codebooks, codebook_size=b.codebook_size, codebook_dim=b.codebook_dim,
        seed=b.seed,
    )
    return MaskedPredictionModel(
        encoder, target_features=target_features, quantizer=quantizer,
        mask_prob=cfg.mask.prob, mask_length=cfg.mask.length, min_masks=cfg.mask.min_masks,
    )


def build_data2vec_model(cfg: ModelConfig) -> Data2VecModel | Data2Vec2Model:
    """data2vec 1.0 (``objective: data2vec``) or 2.0 (``data2vec2``): the encoder, an EMA
    teacher that starts as a copy of its context network, and a regression head (1.0) or
    a conv decoder (2.0)."""
    d = cfg.data2vec
    encoder = build_encoder(cfg)
    common = dict(
        top_k=d.top_k, instance_norm_targets=d.instance_norm_targets, loss_scale=d.loss_scale,
        ema=(d.ema_decay, d.ema_end_decay, d.ema_anneal_steps), mask_prob=cfg.mask.prob,
        mask_length=cfg.mask.length,
    )
    if cfg.objective == "data2vec":
        return Data2VecModel(encoder, min_masks=cfg.mask.min_masks, **common)
    decoder = ConvDecoder(
        encoder.dim, decoder_dim=d.decoder_dim, kernel=d.decoder_kernel, groups=d.decoder_groups,
        num_layers=d.decoder_layers, input_dropout=d.decoder_input_dropout, noise_std=d.mask_noise_std,
    )
    return Data2Vec2Model(encoder, decoder, clones=d.clones, mask_adjust=d.mask_adjust, **common)


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
