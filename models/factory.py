"""Builds the models from ``ModelConfig``: the only reader of the model config."""

from __future__ import annotations

import math

from torch import nn

from models.best_rq import RandomProjectionQuantizer
from models.causal_conv import CausalConvContext, Wav2VecFeatureEncoder
from models.config import TARGET_HOP, ModelConfig
from models.conformer import ConformerEncoder
from models.data2vec import ConvDecoder, Data2Vec2Model, Data2VecModel
from models.feature_encoder import FeatureEncoder, FeatureProjection, IdentityProjection
from models.frontends import LogMelFrontend
from models.gru import GRUContext
from models.hubert import CosineHead
from models.just import JustModel
from models.masked_prediction import MaskedPredictionModel
from models.quantizer import GumbelVectorQuantizer
from models.reconstruction import ApcModel, MaskedReconstructionModel
from models.transformer import TransformerEncoder
from models.vq import KmeansVectorQuantizer, QuantizedProjection
from models.vq_bert import TokenEncoder, VqBertForCTC, VqBertModel, VqTokeniser
from models.w2v_bert import W2vBertModel
from models.wav2vec1 import Wav2VecModel
from models.wav2vec2 import Wav2Vec2Encoder, Wav2Vec2ForCTC, Wav2Vec2ForPretraining

PretrainingModel = (
    Wav2Vec2ForPretraining | MaskedPredictionModel | Wav2VecModel | ApcModel | MaskedReconstructionModel
    | Data2VecModel | Data2Vec2Model | VqBertModel | W2vBertModel
)


def build_frontend(cfg: ModelConfig) -> FeatureEncoder | LogMelFrontend | Wav2VecFeatureEncoder:
    """The conv feature encoder (``model.encoder``; wav2vec 1.0's in its ``wav2vec`` mode) or
    log-mel filterbanks (``model.frontend``)."""
    if cfg.frontend.kind == "logmel":
        fe = cfg.frontend
        return LogMelFrontend(fe.n_mels, win_length=fe.window, hop_length=fe.hop, stack=fe.stack,
                              normalize=fe.normalize, deltas=fe.deltas)
    enc = cfg.encoder
    if enc.mode == "wav2vec":
        return Wav2VecFeatureEncoder(enc.conv_layers, activation=enc.activation, conv_bias=enc.conv_bias)
    return FeatureEncoder(enc.conv_layers, mode=enc.mode, conv_bias=enc.conv_bias)


def build_vq_quantizer(cfg: ModelConfig) -> GumbelVectorQuantizer | KmeansVectorQuantizer:
    """vq-wav2vec's quantizer of the front end's frames (``model.vq_wav2vec``); its
    codewords together are as wide as the frames (fairseq's ``vq_dim`` 0)."""
    vq, dim = cfg.vq_wav2vec, cfg.frontend_dim
    if vq.kind == "kmeans":
        return KmeansVectorQuantizer(dim, groups=vq.groups, entries=vq.entries, shared_codebook=vq.shared_codebook,
                                     gamma=vq.gamma, codebook_std=vq.codebook_std)
    t = vq.temperature
    activation = nn.ReLU() if cfg.encoder.activation == "relu" else nn.GELU()
    return GumbelVectorQuantizer(
        dim, groups=vq.groups, entries=vq.entries, codevector_dim=dim, temperature=(t.start, t.end, t.decay),
        proj_depth=vq.proj_depth, shared_codebook=vq.shared_codebook, activation=activation,
    )


def build_encoder(cfg: ModelConfig) -> Wav2Vec2Encoder:
    """Front end + projection + mask embedding + context network.

    The projection is LayerNorm + Linear for a Transformer or Conformer; a causal context
    network (causal_conv, gru) reads the front end's frames as they are, or, for
    vq-wav2vec, their quantization (the quantizer is then part of the encoder).
    """
    if cfg.objective == "vq_bert":
        raise ValueError(
            "model.objective=vq_bert: its BERT reads vq-wav2vec's tokens, not audio, so it has no audio encoder to "
            "fine-tune on its own (the probe reads it through its tokeniser: jobs.bench probe)"
        )
    tr = cfg.transformer
    feature_encoder = build_frontend(cfg)
    projection: FeatureProjection | IdentityProjection | QuantizedProjection
    if cfg.objective == "vq_wav2vec":
        projection = QuantizedProjection(build_vq_quantizer(cfg), cfg.frontend_dim, cfg.dropout_input)
    elif tr.causal:
        projection = IdentityProjection(cfg.frontend_dim, cfg.dropout_input)
    else:
        projection = FeatureProjection(cfg.frontend_dim, tr.dim, cfg.dropout_input)
    common = dict(
        dim=tr.dim, ffn_dim=tr.ffn_dim, num_layers=tr.num_layers, num_heads=tr.num_heads,
        dropout=tr.dropout, attention_dropout=tr.attention_dropout,
        activation_dropout=tr.activation_dropout, layerdrop=tr.layerdrop,
        layer_norm_first=tr.layer_norm_first,
    )
    transformer: TransformerEncoder | ConformerEncoder | CausalConvContext | GRUContext
    if tr.kind == "conformer":
        transformer = ConformerEncoder(**common, conv_kernel=tr.conv_kernel, position=tr.position)
    elif tr.kind == "causal_conv":
        transformer = CausalConvContext(in_dim=projection.out_dim, dim=tr.dim, num_layers=tr.num_layers,
                                        dropout=tr.dropout, activation=tr.activation)
    elif tr.kind == "gru":
        transformer = GRUContext(in_dim=projection.out_dim, dim=tr.dim, num_layers=tr.num_layers, dropout=tr.dropout)
    else:
        transformer = TransformerEncoder(
            **common, pos_conv_kernel=tr.pos_conv_kernel, pos_conv_groups=tr.pos_conv_groups,
            pos_conv_depth=tr.pos_conv_depth, alibi=tr.alibi,
            relative_bias=tr.relative_bias, relative_buckets=tr.relative_buckets,
            relative_max_distance=tr.relative_max_distance,
            absolute_positions=tr.absolute_positions,
        )
    # The log-mel front end has no weights: nothing to scale the gradient of.
    grad_mult = cfg.encoder.grad_mult if cfg.frontend.kind == "conv" else 1.0
    return Wav2Vec2Encoder(feature_encoder, projection, transformer, grad_mult=grad_mult)


def build_pretraining_model(cfg: ModelConfig) -> PretrainingModel:
    """The self-supervised model of ``cfg``'s objective with fresh weights."""
    builders = {
        "best_rq": build_best_rq_model, "hubert": build_hubert_model, "wav2vec": build_wav2vec_model,
        "vq_wav2vec": build_wav2vec_model, "apc": build_apc_model, "tera": build_tera_model,
        "data2vec": build_data2vec_model, "data2vec2": build_data2vec_model, "vq_bert": build_vq_bert_model,
        "w2v_bert": build_w2v_bert_model, "just": build_just_model,
    }
    return builders.get(cfg.objective, build_wav2vec2_model)(cfg)


def build_gumbel_quantizer(cfg: ModelConfig) -> GumbelVectorQuantizer:
    """wav2vec 2.0's quantizer of the front end's frames (``model.quantizer``), also w2v-BERT's."""
    q = cfg.quantizer
    return GumbelVectorQuantizer(
        cfg.frontend_dim, groups=q.groups, entries=q.entries, codevector_dim=cfg.codevector_dim,
        temperature=(q.temperature.start, q.temperature.end, q.temperature.decay),
    )


def _contrastive_args(cfg: ModelConfig) -> dict[str, float | int]:
    """The settings of wav2vec 2.0's masking and loss, shared by w2v-BERT's contrastive module."""
    return dict(
        final_dim=cfg.final_dim, dropout_features=cfg.dropout_features,
        mask_prob=cfg.mask.prob, mask_length=cfg.mask.length, min_masks=cfg.mask.min_masks,
        num_negatives=cfg.loss.num_negatives, logit_temp=cfg.loss.logit_temp,
        diversity_weight=cfg.loss.diversity_weight, feature_penalty_weight=cfg.loss.feature_penalty_weight,
    )


def build_wav2vec2_model(cfg: ModelConfig) -> Wav2Vec2ForPretraining:
    """wav2vec 2.0's contrastive model (fairseq's initialisation)."""
    return Wav2Vec2ForPretraining(build_encoder(cfg), build_gumbel_quantizer(cfg), **_contrastive_args(cfg))


def build_w2v_bert_model(cfg: ModelConfig) -> W2vBertModel:
    """w2v-BERT: wav2vec 2.0's model on the first ``model.w2v_bert.contrastive_layers`` Conformer
    blocks, and a head predicting its quantizer's ids from the last block's output."""
    w = cfg.w2v_bert
    return W2vBertModel(
        build_encoder(cfg), build_gumbel_quantizer(cfg), contrastive_layers=cfg.w2v_bert_contrastive_layers,
        contrastive_weight=w.contrastive_weight, mlm_weight=w.mlm_weight, **_contrastive_args(cfg),
    )


def build_just_model(cfg: ModelConfig) -> JustModel:
    """JUST: w2v-BERT's model with a ``model.just.vocab_size``-way CTC head on its last block."""
    w = cfg.w2v_bert
    if cfg.just.vocab_size == 0:
        raise ValueError("model.just.vocab_size is 0: it is set from finetune.vocab when a JUST run starts "
                         "(pipeline.train.just.resolve_config); a JUST model is built from a resolved config")
    return JustModel(
        build_encoder(cfg), build_gumbel_quantizer(cfg), vocab_size=cfg.just.vocab_size,
        final_dropout=cfg.final_dropout, contrastive_layers=cfg.w2v_bert_contrastive_layers,
        contrastive_weight=w.contrastive_weight, mlm_weight=w.mlm_weight, **_contrastive_args(cfg),
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


def build_hubert_model(cfg: ModelConfig) -> MaskedPredictionModel:
    """HuBERT (and WavLM, whose differences are the encoder's gated relative bias and the
    step's mixing): masked prediction of given k-means labels through cosine logits."""
    encoder = build_encoder(cfg)
    head = CosineHead(encoder.dim, cfg.final_dim, cfg.hubert.clusters, logit_temp=cfg.loss.logit_temp)
    return MaskedPredictionModel(
        encoder, codebooks=1, codebook_size=cfg.hubert.clusters, head=head,
        mask_prob=cfg.mask.prob, mask_length=cfg.mask.length, min_masks=cfg.mask.min_masks,
        feature_penalty_weight=cfg.loss.feature_penalty_weight,
    )


def prediction_offset(cfg: ModelConfig) -> int:
    """wav2vec's ``model.wav2vec.offset``; -1 resolves to fairseq's ``auto``: the front end's
    receptive field over its stride, rounded up (465 / 160 -> 3 for wav2vec 1.0's layers),
    so the first predicted frame shares no sample with the context's newest frame."""
    if cfg.wav2vec.offset >= 0:
        return cfg.wav2vec.offset
    if cfg.frontend.kind == "logmel":
        fe = cfg.frontend
        field, jump = fe.window + (fe.stack - 1) * fe.hop, fe.hop * fe.stack
    else:
        field, jump = 1, 1
        for _, kernel, stride in cfg.encoder.conv_layers:
            field += (int(kernel) - 1) * jump
            jump *= int(stride)
    return math.ceil(field / jump)


def build_wav2vec_model(cfg: ModelConfig) -> Wav2VecModel:
    """wav2vec (1.0), or vq-wav2vec's first stage (``model.objective=vq_wav2vec``)."""
    w, vq = cfg.wav2vec, cfg.vq_wav2vec
    weight = 0.0
    if cfg.objective == "vq_wav2vec":
        weight = vq.kmeans_weight if vq.kind == "kmeans" else vq.diversity_weight
    return Wav2VecModel(
        build_encoder(cfg), target_dim=cfg.frontend_dim, prediction_steps=w.prediction_steps,
        num_negatives=w.num_negatives, offset=prediction_offset(cfg), dropout_context=w.dropout_context,
        dropout_predictions=w.dropout_predictions, quantizer_weight=weight,
    )


def build_apc_model(cfg: ModelConfig) -> ApcModel:
    """APC: the log-mel frame ``model.apc.shift`` frames ahead from a causal context network."""
    fe = cfg.frontend
    return ApcModel(build_encoder(cfg), n_mels=fe.n_mels, deltas=fe.deltas, stack=fe.stack, shift=cfg.apc.shift)


def build_tera_model(cfg: ModelConfig) -> MaskedReconstructionModel:
    """Mockingjay/TERA: reconstruction of altered log-mel frames (``model.mask``, ``model.tera``)."""
    fe, t, m = cfg.frontend, cfg.tera, cfg.mask
    return MaskedReconstructionModel(
        build_encoder(cfg), n_mels=fe.n_mels, deltas=fe.deltas, stack=fe.stack, mask_prob=m.prob,
        mask_length=m.length, min_masks=m.min_masks, zero_prob=t.zero_prob, replace_prob=t.replace_prob,
        freq_width=t.freq_width, noise_prob=t.noise_prob, noise_std=t.noise_std,
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


def build_token_encoder(cfg: ModelConfig) -> TokenEncoder:
    """vq_bert's BERT: the Transformer of ``model.transformer`` on an embedding of the tokens."""
    tr = cfg.transformer
    if tr.kind != "transformer":
        raise ValueError(f"model.objective=vq_bert: a BERT needs model.transformer.kind='transformer', got {tr.kind!r}")
    transformer = TransformerEncoder(
        dim=tr.dim, ffn_dim=tr.ffn_dim, num_layers=tr.num_layers, num_heads=tr.num_heads, dropout=tr.dropout,
        attention_dropout=tr.attention_dropout, activation_dropout=tr.activation_dropout, layerdrop=tr.layerdrop,
        layer_norm_first=tr.layer_norm_first, pos_conv_kernel=tr.pos_conv_kernel, pos_conv_groups=tr.pos_conv_groups,
        absolute_positions=tr.absolute_positions,
    )
    return TokenEncoder(cfg.vq_bert.vocab, transformer, dropout_input=cfg.dropout_input,
                        scale_embedding=cfg.vq_bert.scale_embedding)


def build_vq_bert_model(cfg: ModelConfig) -> VqBertModel:
    """vq-wav2vec's BERT on its tokens (``model.vq_bert``, ``model.mask``, ``model.transformer``):
    no audio front end."""
    vb, m = cfg.vq_bert, cfg.mask
    return VqBertModel(build_token_encoder(cfg), mask_prob=m.prob, mask_length=m.length, min_masks=m.min_masks,
                       random_token_prob=vb.random_token_prob, leave_unmasked_prob=vb.leave_unmasked_prob,
                       tie_embedding=vb.tie_embedding)


def build_vq_tokeniser(cfg: ModelConfig) -> VqTokeniser:
    """The tokeniser a vq_bert model reads audio through (:class:`models.vq_bert.VqTokeniser`):
    the front end (``model.frontend``, ``model.encoder``) and quantizer (``model.vq_wav2vec``)
    of the vq-wav2vec model that made its tokens, ``model.vq_bert.vocab`` ids."""
    return VqTokeniser(build_frontend(cfg), build_vq_quantizer(cfg), cfg.vq_bert.vocab)


def build_ctc_model(cfg: ModelConfig, vocab_size: int) -> Wav2Vec2ForCTC | VqBertForCTC:
    """The fine-tuning model of ``cfg`` with a ``vocab_size``-way head (blank included).

    Load pretrained encoder weights with ``model.load_encoder_state_dict(state_dict)``. A
    vq_bert config gives its BERT behind its tokeniser (:func:`build_vq_tokeniser`).
    """
    if cfg.objective == "vq_bert":
        return VqBertForCTC(
            build_vq_tokeniser(cfg), build_token_encoder(cfg), vocab_size, final_dropout=cfg.final_dropout,
            mask_prob=cfg.mask.prob, mask_length=cfg.mask.length, min_masks=cfg.mask.min_masks,
            channel_prob=cfg.mask.channel_prob, channel_length=cfg.mask.channel_length,
        )
    return Wav2Vec2ForCTC(
        build_encoder(cfg), vocab_size, final_dropout=cfg.final_dropout,
        mask_prob=cfg.mask.prob, mask_length=cfg.mask.length, min_masks=cfg.mask.min_masks,
        channel_prob=cfg.mask.channel_prob, channel_length=cfg.mask.channel_length,
    )


def count_parameters(model) -> int:  # noqa: ANN001 - any nn.Module
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
