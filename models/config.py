"""Typed configuration of the wav2vec 2.0 model, and its presets.

The model config is the ``model`` section of wavray's config tree
(``pipeline.config``); it lives here so that ``models/`` stays importable without
the pipeline. ``models.factory`` is the only reader of these dataclasses.

Defaults are the BASE recipe of SPEC.md (fairseq's ``wav2vec2_base_librispeech``).
Where the paper and fairseq's code disagree, the value follows fairseq's code and
the field's docstring says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


def _default_conv_layers() -> list[list[int]]:
    # (channels, kernel, stride) per layer: receptive field 400 samples, stride 320.
    return [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2


@dataclass(kw_only=True)
class FeatureEncoderConfig:
    """The convolutional feature encoder (waveform -> latents z, one per 20 ms)."""

    conv_layers: list[list[int]] = field(default_factory=_default_conv_layers)
    """(channels, kernel, stride) of each temporal convolution."""
    mode: Literal["default", "layer_norm"] = "default"
    """``default``: GroupNorm (one group per channel) after the first conv only (BASE);
    ``layer_norm``: LayerNorm over channels after every conv (LARGE)."""
    conv_bias: bool = False
    """Bias in the convolutions (False in BASE, True in LARGE LV-60k)."""
    grad_mult: float = 0.1
    """Scale of the gradient flowing into the encoder (fairseq ``feature_grad_mult``)."""

    def __post_init__(self) -> None:
        if not self.conv_layers:
            raise ValueError("model.encoder.conv_layers: expected at least one layer, got []")
        for i, layer in enumerate(self.conv_layers):
            if len(layer) != 3 or any(int(v) <= 0 for v in layer):
                raise ValueError(
                    f"model.encoder.conv_layers[{i}]: expected [channels, kernel, stride] "
                    f"of positive ints, got {layer!r}"
                )
        if self.mode not in ("default", "layer_norm"):
            raise ValueError(
                f"model.encoder.mode: expected 'default' or 'layer_norm', got {self.mode!r}"
            )
        if self.grad_mult < 0:
            raise ValueError(f"model.encoder.grad_mult: expected >= 0, got {self.grad_mult}")

    @property
    def dim(self) -> int:
        """Channels of the last convolution (the latent dimension, 512 in BASE)."""
        return int(self.conv_layers[-1][0])


@dataclass(kw_only=True)
class FrontendConfig:
    """What turns the waveform into frames: the conv feature encoder (``model.encoder``) or
    log-mel filterbanks (``models.frontends.LogMelFrontend``; FAMILY.md sections 6, 7, 10)."""

    kind: Literal["conv", "logmel"] = "conv"
    """``conv``: wav2vec 2.0's learned feature encoder (``model.encoder``), 20 ms frames;
    ``logmel``: ``n_mels`` filterbanks every ``hop`` samples, ``stack`` frames side by side."""
    n_mels: int = 80
    """log-mel only: filterbank channels."""
    hop: int = 160
    """log-mel only: samples between filterbank frames (160: 10 ms)."""
    window: int = 400
    """log-mel only: analysis window in samples (400: 25 ms)."""
    stack: int = 4
    """log-mel only: frames stacked into one model frame (4 x 10 ms: BEST-RQ's 40 ms)."""
    normalize: bool = True
    """log-mel only: zero mean and unit variance per utterance and channel (BEST-RQ)."""

    def __post_init__(self) -> None:
        if self.kind not in ("conv", "logmel"):
            raise ValueError(f"model.frontend.kind: expected 'conv' or 'logmel', got {self.kind!r}")
        for name in ("n_mels", "hop", "window", "stack"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.frontend.{name}: expected >= 1, got {getattr(self, name)}")
        if self.window > 512:
            raise ValueError(f"model.frontend.window: expected at most 512 samples (the FFT size), got {self.window}")

    @property
    def dim(self) -> int:
        """Values per log-mel frame (``n_mels * stack``)."""
        return self.n_mels * self.stack


@dataclass(kw_only=True)
class TransformerConfig:
    """The context network: conv positional embedding then Transformer layers, or Conformer layers."""

    kind: Literal["transformer", "conformer"] = "transformer"
    """``transformer``: wav2vec 2.0's (conv positional embedding, then Transformer layers);
    ``conformer``: macaron Conformer layers with attention-side positions (``position``)
    and a depthwise convolution (``conv_kernel``), the encoder of wav2vec 2.0-Conformer,
    w2v-BERT and BEST-RQ (FAMILY.md section 5). The conformer has no conv positional
    embedding: ``pos_conv_*`` only size the unused one of Hugging Face's exports."""
    num_layers: int = 12
    dim: int = 768
    ffn_dim: int = 3072
    num_heads: int = 12
    """12 as in fairseq's and Hugging Face's code (the paper says 8; SPEC.md)."""
    layer_norm_first: bool = False
    """Pre-LN (LARGE) instead of post-LN (BASE). Conformer blocks always normalise their
    sub-blocks' inputs and end with a LayerNorm; this field places the stack's own
    LayerNorm after the last layer (True; fairseq's conformer LARGE, Hugging Face's only
    layout) or before the first (False; fairseq's BASE layout)."""
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    layerdrop: float = 0.05
    """Probability of skipping a whole layer in training."""
    pos_conv_kernel: int = 128
    """Kernel of the conv positional embedding (of each of its layers when ``pos_conv_depth`` > 1)."""
    pos_conv_groups: int = 16
    pos_conv_depth: int = 1
    """1: wav2vec 2.0's one weight-normed convolution; more: data2vec's stack of that many
    plain convolutions of ``pos_conv_kernel``, each followed by a non-affine LayerNorm and
    GELU (fairseq ``pos_conv_depth: 5``, ``conv_pos: 95`` = 5 x 19; Hugging Face's
    ``Data2VecAudio``). Transformer only."""
    alibi: bool = False
    """ALiBi in every attention: ``-scale_h * slope_h * |i - j|``, a learned per-head scale
    (data2vec 2.0, FAMILY.md section 4). Transformer only; Hugging Face has no such class."""
    conv_kernel: int = 31
    """Conformer only: kernel of the depthwise convolution over time (odd, so the output
    stays aligned with the input: 'same' padding of ``conv_kernel // 2`` frames a side)."""
    position: Literal["relative", "rotary"] = "relative"
    """Conformer only: ``relative``: Transformer-XL relative positions in every attention
    (sinusoids through ``linear_pos``, learned biases u and v; fairseq ``rel_pos``, Hugging
    Face ``position_embeddings_type="relative"``); ``rotary``: rotary embeddings of the
    attention input (fairseq ``rope``, Hugging Face ``"rotary"``, base 10000)."""

    def __post_init__(self) -> None:
        if self.kind not in ("transformer", "conformer"):
            raise ValueError(
                f"model.transformer.kind: expected 'transformer' or 'conformer', got {self.kind!r}"
            )
        if self.position not in ("relative", "rotary"):
            raise ValueError(
                f"model.transformer.position: expected 'relative' or 'rotary', got {self.position!r}"
            )
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"model.transformer.conv_kernel: expected an odd value >= 1, got {self.conv_kernel}")
        for name in ("num_layers", "dim", "ffn_dim", "num_heads", "pos_conv_kernel", "pos_conv_groups",
                     "pos_conv_depth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.transformer.{name}: expected > 0, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(
                f"model.transformer.dim ({self.dim}) must be divisible by "
                f"model.transformer.num_heads ({self.num_heads})"
            )
        if self.dim % self.pos_conv_groups:
            raise ValueError(
                f"model.transformer.dim ({self.dim}) must be divisible by "
                f"model.transformer.pos_conv_groups ({self.pos_conv_groups})"
            )
        for name in ("dropout", "attention_dropout", "activation_dropout", "layerdrop"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"model.transformer.{name}: expected in [0, 1), got {v}")
        if self.kind == "conformer" and (self.pos_conv_depth > 1 or self.alibi):
            raise ValueError(
                "model.transformer.pos_conv_depth > 1 and model.transformer.alibi are options of the "
                f"Transformer (kind 'transformer'); the conformer has its own positions, got kind {self.kind!r}"
            )
        if self.kind == "conformer":
            # sine/cosine pairs: relative encodings pair channels of the model width,
            # rotary ones channels of each head
            width, what = (self.dim, "dim") if self.position == "relative" else (
                self.dim // self.num_heads, "dim / num_heads"
            )
            if width % 2:
                raise ValueError(
                    f"model.transformer.position={self.position!r}: expected an even {what}, got {width}"
                )


@dataclass(kw_only=True)
class MaskConfig:
    """Span masking of the latents (fairseq's ``compute_mask_indices`` semantics).

    ``prob`` is fairseq's ``mask_prob``: about ``prob * T / length`` span starts per
    utterance, i.e. the paper's p = prob / length per frame (0.065 for 0.65).
    """

    prob: float = 0.65
    length: int = 10
    min_masks: int = 2
    channel_prob: float = 0.0
    """Probability of masking feature channels (fine-tuning regulariser)."""
    channel_length: int = 10

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"model.mask.prob: expected in [0, 1], got {self.prob}")
        if self.length < 1:
            raise ValueError(f"model.mask.length: expected >= 1, got {self.length}")
        if self.min_masks < 0:
            raise ValueError(f"model.mask.min_masks: expected >= 0, got {self.min_masks}")
        if not 0.0 <= self.channel_prob <= 1.0:
            raise ValueError(f"model.mask.channel_prob: expected in [0, 1], got {self.channel_prob}")
        if self.channel_length < 1:
            raise ValueError(f"model.mask.channel_length: expected >= 1, got {self.channel_length}")


@dataclass(kw_only=True)
class TemperatureConfig:
    """Gumbel softmax temperature: ``max(start * decay**step, end)``."""

    start: float = 2.0
    end: float = 0.5
    decay: float = 0.999995

    def __post_init__(self) -> None:
        if not self.start > 0 or not self.end > 0:
            raise ValueError(
                f"model.quantizer.temperature: start and end must be > 0, got "
                f"start={self.start}, end={self.end}"
            )
        if self.end > self.start:
            raise ValueError(
                f"model.quantizer.temperature.end ({self.end}) must be <= start ({self.start})"
            )
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"model.quantizer.temperature.decay: expected in (0, 1], got {self.decay}")


@dataclass(kw_only=True)
class QuantizerConfig:
    """Gumbel product quantizer: ``groups`` codebooks of ``entries`` codewords each."""

    groups: int = 2
    entries: int = 320
    codevector_dim: int = 0
    """Width of the concatenated codewords; 0 means ``model.final_dim`` (fairseq ``latent_dim``)."""
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)

    def __post_init__(self) -> None:
        if self.groups < 1:
            raise ValueError(f"model.quantizer.groups: expected >= 1, got {self.groups}")
        if self.entries < 2:
            raise ValueError(f"model.quantizer.entries: expected >= 2, got {self.entries}")
        if self.codevector_dim < 0:
            raise ValueError(f"model.quantizer.codevector_dim: expected >= 0, got {self.codevector_dim}")
        if self.codevector_dim and self.codevector_dim % self.groups:
            raise ValueError(
                f"model.quantizer.codevector_dim ({self.codevector_dim}) must be divisible by "
                f"model.quantizer.groups ({self.groups})"
            )


@dataclass(kw_only=True)
class LossConfig:
    """Weights and sampling of the pretraining objective."""

    num_negatives: int = 100
    """K distractors per masked frame, from the same utterance's masked frames."""
    logit_temp: float = 0.1
    """kappa: cosine similarities are divided by it."""
    diversity_weight: float = 0.1
    feature_penalty_weight: float = 10.0
    """L2 penalty on the encoder features (fairseq; Hugging Face's model has none)."""

    def __post_init__(self) -> None:
        if self.num_negatives < 1:
            raise ValueError(f"model.loss.num_negatives: expected >= 1, got {self.num_negatives}")
        if self.logit_temp <= 0:
            raise ValueError(f"model.loss.logit_temp: expected > 0, got {self.logit_temp}")
        for name in ("diversity_weight", "feature_penalty_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.loss.{name}: expected >= 0, got {getattr(self, name)}")


@dataclass(kw_only=True)
class BestRqConfig:
    """BEST-RQ's frozen random-projection quantizer (FAMILY.md section 7; ``models.best_rq``):
    the targets are ids of the nearest random codeword of a random projection of each
    frame's normalised log-mel features, stacked to the model's frame rate."""

    codebooks: int = 1
    """Codebooks, each with its own projection and prediction (the multi-softmax option)."""
    codebook_size: int = 8192
    """Codewords per codebook: the chance level of the loss is ln(codebook_size)."""
    codebook_dim: int = 16
    """Width of the projection and of the codewords."""
    n_mels: int = 80
    """Filterbank channels of the target features (10 ms frames, stacked to the frame rate)."""
    seed: int = 0
    """Draws the projection and the codebooks (saved with the model, never trained)."""

    def __post_init__(self) -> None:
        for name in ("codebooks", "codebook_dim", "n_mels"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.best_rq.{name}: expected >= 1, got {getattr(self, name)}")
        if self.codebook_size < 2:
            raise ValueError(f"model.best_rq.codebook_size: expected >= 2, got {self.codebook_size}")


@dataclass(kw_only=True)
class Data2VecConfig:
    """data2vec's teacher, targets and loss (FAMILY.md sections 3, 4; ``models.data2vec``):
    the student regresses, at masked frames, the average of the top ``top_k`` layers'
    feed-forward outputs (each instance-normalised over time) of an EMA teacher that sees
    the unmasked input. ``data2vec`` (1.0) and ``data2vec2`` (2.0) share this section;
    ``clones`` and ``decoder_*`` are data2vec 2.0's."""

    top_k: int = 8
    """Teacher layers averaged into the target (``average_top_k_layers``)."""
    ema_decay: float = 0.999
    """Teacher decay after the first update; it rises linearly to ``ema_end_decay``."""
    ema_end_decay: float = 0.9999
    """Teacher decay from update ``ema_anneal_steps`` on (1.0 freezes the teacher)."""
    ema_anneal_steps: int = 30_000
    """Updates over which the decay rises (``ema_anneal_end_step``)."""
    loss_scale: float = 0.0
    """Factor on the squared error summed over channels; 0 means 1/sqrt(dim) (``loss_scale: null``)."""
    instance_norm_targets: bool = True
    """Instance-normalise each teacher layer's output over time before averaging
    (``instance_norm_target_layer``)."""
    clones: int = 1
    """data2vec 2.0: masked copies of each utterance sharing one teacher pass (``clone_batch``)."""
    mask_adjust: float = 0.05
    """data2vec 2.0: extra span centres drawn, as a fraction of the frames, before exactly
    ``model.mask.prob`` of the frames are kept masked (``mask_prob_adjust``)."""
    mask_noise_std: float = 0.01
    """data2vec 2.0: std of the noise the decoder gets at masked frames."""
    decoder_layers: int = 4
    """data2vec 2.0: grouped conv blocks of the decoder (kernel, residual, LayerNorm, GELU)."""
    decoder_dim: int = 384
    decoder_kernel: int = 7
    decoder_groups: int = 16
    decoder_input_dropout: float = 0.1
    """data2vec 2.0: dropout on the encoder's output before the decoder."""
    min_target_std: float = 0.1
    """Health alarm: targets whose std over masked frames (mean over channels) falls below this
    have collapsed (fairseq ``min_target_var``, a std despite the name)."""
    min_prediction_std: float = 0.01
    """Health alarm: the same floor for the predictions (fairseq ``min_pred_var``)."""

    def __post_init__(self) -> None:
        for name in ("top_k", "clones", "decoder_layers", "decoder_dim", "decoder_kernel", "decoder_groups",
                     "ema_anneal_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.data2vec.{name}: expected >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay <= self.ema_end_decay <= 1.0:
            raise ValueError(
                f"model.data2vec.ema_decay ({self.ema_decay}) and ema_end_decay ({self.ema_end_decay}): expected "
                "0 <= ema_decay <= ema_end_decay <= 1"
            )
        for name in ("loss_scale", "mask_adjust", "mask_noise_std", "min_target_std", "min_prediction_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.data2vec.{name}: expected >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.decoder_input_dropout < 1.0:
            raise ValueError(
                f"model.data2vec.decoder_input_dropout: expected in [0, 1), got {self.decoder_input_dropout}"
            )
        if self.decoder_dim % self.decoder_groups:
            raise ValueError(
                f"model.data2vec.decoder_dim ({self.decoder_dim}) must be divisible by "
                f"model.data2vec.decoder_groups ({self.decoder_groups})"
            )


OBJECTIVES = ("wav2vec2", "best_rq", "data2vec", "data2vec2")
"""What a pretraining model learns to do (``model.objective``)."""
TARGET_HOP = 160
"""Samples between the log-mel frames that targets are computed from (10 ms)."""


@dataclass(kw_only=True)
class ModelConfig:
    """A pretraining model: a front end, a context network and an objective.

    ``objective``: ``wav2vec2`` (contrastive over a Gumbel quantizer's codes: ``quantizer``,
    ``loss``), ``best_rq`` (masked prediction of random-projection codes: ``best_rq``),
    ``data2vec`` / ``data2vec2`` (regression to an EMA teacher: ``data2vec``).
    """

    objective: Literal["wav2vec2", "best_rq", "data2vec", "data2vec2"] = "wav2vec2"
    """The pretraining objective; every objective trains with any front end and context network."""
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    encoder: FeatureEncoderConfig = field(default_factory=FeatureEncoderConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    best_rq: BestRqConfig = field(default_factory=BestRqConfig)
    data2vec: Data2VecConfig = field(default_factory=Data2VecConfig)
    final_dim: int = 256
    """Width of the space where context and quantized targets are compared."""
    dropout_input: float = 0.1
    """Dropout on the projected features before masking."""
    dropout_features: float = 0.1
    """Dropout on the unmasked latents that feed the quantizer."""
    final_dropout: float = 0.0
    """Fine-tuning only: dropout on the context vectors before the CTC head (fairseq
    ``final_dropout``, Hugging Face ``final_dropout``)."""

    def __post_init__(self) -> None:
        if self.final_dim < 1:
            raise ValueError(f"model.final_dim: expected >= 1, got {self.final_dim}")
        for name in ("dropout_input", "dropout_features", "final_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"model.{name}: expected in [0, 1), got {v}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"model.objective: expected one of {list(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "best_rq" and self.frame_stride % TARGET_HOP:
            raise ValueError(
                f"model.objective=best_rq: its targets are 10 ms log-mel frames stacked to the model's frame "
                f"rate, so the frame stride must be a multiple of {TARGET_HOP} samples, got {self.frame_stride}"
            )
        if self.objective in ("data2vec", "data2vec2"):
            self._check_data2vec()
        cv = self.quantizer.codevector_dim or self.final_dim
        if cv % self.quantizer.groups:
            raise ValueError(
                f"model.quantizer.codevector_dim (resolved to {cv}) must be divisible by "
                f"model.quantizer.groups ({self.quantizer.groups})"
            )

    def _check_data2vec(self) -> None:
        tr, d2v = self.transformer, self.data2vec
        where = f"model.objective={self.objective}"
        if tr.kind != "transformer":
            raise ValueError(f"{where}: the targets are Transformer layers' feed-forward outputs; "
                             f"expected model.transformer.kind 'transformer', got {tr.kind!r}")
        if d2v.top_k > tr.num_layers:
            raise ValueError(f"model.data2vec.top_k ({d2v.top_k}) must be <= model.transformer.num_layers "
                             f"({tr.num_layers})")
        if self.objective == "data2vec2" and tr.dim % d2v.decoder_groups:
            raise ValueError(f"model.transformer.dim ({tr.dim}) must be divisible by model.data2vec.decoder_groups "
                             f"({d2v.decoder_groups}): the decoder's first convolution reads it")
        if self.objective == "data2vec" and d2v.clones != 1:
            raise ValueError(f"model.data2vec.clones: data2vec 1.0 has none (data2vec2 does), got {d2v.clones}")

    @property
    def codevector_dim(self) -> int:
        """Resolved width of the concatenated codewords."""
        return self.quantizer.codevector_dim or self.final_dim

    @property
    def frame_stride(self) -> int:
        """Samples per model frame: the conv strides' product, or log-mel hop x stack."""
        if self.frontend.kind == "logmel":
            return self.frontend.hop * self.frontend.stack
        return math.prod(int(s) for _, _, s in self.encoder.conv_layers)

    @property
    def frontend_dim(self) -> int:
        """Values per frame the front end gives the projection."""
        return self.frontend.dim if self.frontend.kind == "logmel" else self.encoder.dim


# --- presets -------------------------------------------------------------------------


def base() -> ModelConfig:
    """BASE (95M): 12 layers, 768 wide, group-norm extractor, post-LN."""
    return ModelConfig()


def large() -> ModelConfig:
    """LARGE (317M, LibriSpeech / LV-60k recipe of the paper): 24 layers, 1024 wide, pre-LN."""
    cfg = base()
    cfg.encoder.mode = "layer_norm"
    cfg.encoder.conv_bias = True
    cfg.transformer = TransformerConfig(
        num_layers=24, dim=1024, ffn_dim=4096, num_heads=16, layer_norm_first=True,
        dropout=0.0, attention_dropout=0.1, activation_dropout=0.0, layerdrop=0.2,
    )
    cfg.final_dim = 768
    return cfg


def large_lv60k() -> ModelConfig:
    """LARGE on LV-60k as fairseq's ``wav2vec2_large_librivox`` (SPEC.md, "disagree")."""
    cfg = large()
    cfg.encoder.grad_mult = 1.0
    cfg.transformer.dropout = 0.0
    cfg.transformer.attention_dropout = 0.0
    cfg.transformer.activation_dropout = 0.0
    cfg.transformer.layerdrop = 0.0
    cfg.dropout_input = 0.0
    cfg.dropout_features = 0.0
    cfg.loss.feature_penalty_weight = 0.0
    cfg.quantizer.temperature = TemperatureConfig(start=2.0, end=0.1, decay=0.999995)
    return cfg


def tiny() -> ModelConfig:
    """A laptop/test model (~0.1M parameters) with the full architecture of BASE.

    Same conv strides as BASE (20 ms frames) so data and masking behave as at scale;
    narrow everything else.
    """
    cfg = base()
    cfg.encoder.conv_layers = [[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2
    cfg.transformer = TransformerConfig(
        num_layers=2, dim=64, ffn_dim=128, num_heads=4, layerdrop=0.0,
        pos_conv_kernel=16, pos_conv_groups=4, dropout=0.0, attention_dropout=0.0,
    )
    cfg.quantizer.entries = 32
    cfg.final_dim = 32
    cfg.loss.num_negatives = 20
    cfg.dropout_input = 0.0
    cfg.dropout_features = 0.0
    return cfg


def laptop() -> ModelConfig:
    """The tiny model with the settings that make it learn within a laptop budget.

    fairseq's advice for new models (SPEC.md, "disagree": layer-norm extractor, full
    gradient into it, no feature penalty; the run config adds normalised input), spans of
    5 frames for 3 s crops, and a temperature that anneals within hundreds of updates.
    """
    cfg = tiny()
    cfg.encoder.mode = "layer_norm"
    cfg.encoder.grad_mult = 1.0
    cfg.loss.feature_penalty_weight = 0.0
    cfg.mask.prob = 0.5
    cfg.mask.length = 5
    cfg.quantizer.temperature.decay = 0.999
    return cfg


def best_rq() -> ModelConfig:
    """BEST-RQ BASE as SpeechBrain's recipe (FAMILY.md section 7): 80 normalised log-mel
    channels stacked to 40 ms (SpeechBrain subsamples with two conv layers), 12 pre-LN
    Conformer layers of 576 with 8 heads and relative positions, one codebook of 8192
    16-dim codes, about 60% of frames masked (0.15 span starts per 10 ms frame, 4 frames
    each, is one 40 ms frame each: prob 0.6, length 1)."""
    cfg = ModelConfig(objective="best_rq")
    cfg.frontend = FrontendConfig(kind="logmel", n_mels=80, hop=160, window=400, stack=4, normalize=True)
    cfg.transformer = TransformerConfig(
        kind="conformer", num_layers=12, dim=576, ffn_dim=2048, num_heads=8, layer_norm_first=True,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, layerdrop=0.0, conv_kernel=31,
        position="relative",
    )
    cfg.encoder.grad_mult = 1.0
    cfg.mask = MaskConfig(prob=0.6, length=1, min_masks=2)
    cfg.best_rq = BestRqConfig(codebooks=1, codebook_size=8192, codebook_dim=16)
    cfg.dropout_input = 0.0
    return cfg


def best_rq_laptop() -> ModelConfig:
    """BEST-RQ at the laptop preset's size (2 Conformer layers of 64): what learns on the
    demo corpus within minutes of CPU."""
    cfg = best_rq()
    cfg.transformer = TransformerConfig(
        kind="conformer", num_layers=2, dim=64, ffn_dim=128, num_heads=4, layer_norm_first=True,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, conv_kernel=15,
        position="relative",
    )
    cfg.best_rq.codebook_size = 256
    return cfg


def data2vec() -> ModelConfig:
    """data2vec 1.0 BASE, fairseq's ``data2vec/config/audio/pretraining/base_librispeech.yaml``
    (FAMILY.md section 3): layer-norm extractor with the full gradient, a 5-layer conv
    positional embedding of kernel 19 (95 // 5), 12 post-LN layers of 768, LayerDrop 0.05,
    spans of 10 at mask_prob 0.65 (min_masks 1), targets the top 8 layers' instance-normed
    FFN outputs, EMA 0.999 -> 0.9999 over 30k updates, MSE scaled by 1/sqrt(768)."""
    cfg = ModelConfig(objective="data2vec")
    cfg.encoder.mode = "layer_norm"
    cfg.encoder.grad_mult = 1.0
    cfg.transformer.pos_conv_kernel = 19
    cfg.transformer.pos_conv_depth = 5
    cfg.mask = MaskConfig(prob=0.65, length=10, min_masks=1)
    cfg.data2vec = Data2VecConfig(top_k=8, ema_decay=0.999, ema_end_decay=0.9999, ema_anneal_steps=30_000)
    cfg.dropout_input = 0.0
    cfg.dropout_features = 0.0
    return cfg


def data2vec2() -> ModelConfig:
    """data2vec 2.0 BASE, fairseq's ``data2vec/config/v2/base_audio_only_task.yaml`` (FAMILY.md
    section 4): data2vec 1.0's encoder with ALiBi in every attention; 8 masked clones of each
    utterance, each with exactly half of its frames masked (spans of 5 around 0.55 x T / 5
    centres) and dropped from the student; a 4-block conv decoder (384 channels, kernel 7,
    16 groups) fills them in; one teacher pass per utterance, the whole context network
    averaged with decay 0.999 -> 0.99999 over 75k updates."""
    cfg = data2vec()
    cfg.objective = "data2vec2"
    cfg.transformer.alibi = True
    cfg.mask = MaskConfig(prob=0.5, length=5, min_masks=0)
    cfg.data2vec = Data2VecConfig(
        top_k=8, ema_decay=0.999, ema_end_decay=0.99999, ema_anneal_steps=75_000, clones=8, mask_adjust=0.05,
        decoder_layers=4, decoder_dim=384, decoder_kernel=7, decoder_groups=16, decoder_input_dropout=0.1,
    )
    return cfg


def _laptop_context(cfg: ModelConfig) -> None:
    """The laptop model's size (``laptop()``): 20 ms frames of a 32-channel layer-norm
    extractor, 2 post-LN layers of 64 with 4 heads, no dropout or LayerDrop."""
    small = laptop()
    cfg.encoder = small.encoder
    depth, alibi = cfg.transformer.pos_conv_depth, cfg.transformer.alibi
    cfg.transformer = TransformerConfig(
        num_layers=2, dim=64, ffn_dim=128, num_heads=4, layerdrop=0.0, dropout=0.0, attention_dropout=0.0,
        pos_conv_kernel=5, pos_conv_groups=4, pos_conv_depth=depth, alibi=alibi,
    )


def data2vec_laptop() -> ModelConfig:
    """data2vec 1.0 at the laptop preset's size: both layers are the target (top_k 2), the
    masking of ``laptop()`` (spans of 5 for 3 s crops), a 3-layer positional stack of kernel 5,
    and a teacher that follows within tens of updates (0.99 -> 0.999 over 500)."""
    cfg = data2vec()
    cfg.transformer.pos_conv_depth = 3
    _laptop_context(cfg)
    cfg.mask = MaskConfig(prob=0.5, length=5, min_masks=1)
    cfg.data2vec = Data2VecConfig(top_k=2, ema_decay=0.99, ema_end_decay=0.999, ema_anneal_steps=500)
    return cfg


def data2vec2_laptop() -> ModelConfig:
    """data2vec 2.0 at the laptop preset's size: ``data2vec_laptop``'s encoder and teacher
    schedule, with ALiBi, 4 clones and a 2-block decoder of 32 channels (4 groups, kernel 7)."""
    cfg = data2vec2()
    cfg.transformer.pos_conv_depth = 3
    _laptop_context(cfg)
    cfg.data2vec = Data2VecConfig(
        top_k=2, ema_decay=0.99, ema_end_decay=0.999, ema_anneal_steps=500, clones=4, mask_adjust=0.05,
        decoder_layers=2, decoder_dim=32, decoder_kernel=7, decoder_groups=4, decoder_input_dropout=0.1,
    )
    return cfg


PRESETS = {
    "tiny": tiny, "base": base, "large": large, "large_lv60k": large_lv60k, "laptop": laptop,
    "best_rq": best_rq, "best_rq_laptop": best_rq_laptop,
    "data2vec": data2vec, "data2vec_laptop": data2vec_laptop, "data2vec2": data2vec2,
    "data2vec2_laptop": data2vec2_laptop,
}
