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
import warnings
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
    mode: Literal["default", "layer_norm", "wav2vec"] = "default"
    """``default``: GroupNorm (one group per channel) after the first conv only (BASE);
    ``layer_norm``: LayerNorm over channels after every conv (LARGE); ``wav2vec``: wav2vec
    1.0's encoder (``models.causal_conv``): GroupNorm with one group after every conv, then
    ``log(|z| + 1)``; its stride is the strides' product (160 for wav2vec 1.0's layers)."""
    conv_bias: bool = False
    """Bias in the convolutions (False in BASE, True in LARGE LV-60k)."""
    grad_mult: float = 0.1
    """Scale of the gradient flowing into the encoder (fairseq ``feature_grad_mult``)."""
    activation: Literal["gelu", "relu"] = "gelu"
    """After each conv: GELU (wav2vec 2.0, every mode); ``wav2vec`` mode also takes ReLU
    (wav2vec 1.0; vq-wav2vec uses GELU)."""

    def __post_init__(self) -> None:
        if not self.conv_layers:
            raise ValueError("model.encoder.conv_layers: expected at least one layer, got []")
        for i, layer in enumerate(self.conv_layers):
            if len(layer) != 3 or any(int(v) <= 0 for v in layer):
                raise ValueError(
                    f"model.encoder.conv_layers[{i}]: expected [channels, kernel, stride] "
                    f"of positive ints, got {layer!r}"
                )
        if self.mode not in ("default", "layer_norm", "wav2vec"):
            raise ValueError(
                f"model.encoder.mode: expected 'default', 'layer_norm' or 'wav2vec', got {self.mode!r}"
            )
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"model.encoder.activation: expected 'gelu' or 'relu', got {self.activation!r}")
        if self.activation != "gelu" and self.mode != "wav2vec":
            raise ValueError(
                f"model.encoder.activation={self.activation!r}: only the wav2vec mode takes another activation "
                f"than GELU, got mode {self.mode!r}"
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
    deltas: int = 0
    """log-mel only: 1 appends the first time derivative of every channel, 2 also the
    second (Mockingjay's input: 80 log-mel + deltas + delta-deltas = 240 per 10 ms frame);
    each frame is then ``[static, delta, delta-delta]``."""

    def __post_init__(self) -> None:
        if self.kind not in ("conv", "logmel"):
            raise ValueError(f"model.frontend.kind: expected 'conv' or 'logmel', got {self.kind!r}")
        for name in ("n_mels", "hop", "window", "stack"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.frontend.{name}: expected >= 1, got {getattr(self, name)}")
        if self.window > 512:
            raise ValueError(f"model.frontend.window: expected at most 512 samples (the FFT size), got {self.window}")
        if self.deltas not in (0, 1, 2):
            raise ValueError(f"model.frontend.deltas: expected 0, 1 or 2, got {self.deltas}")

    @property
    def dim(self) -> int:
        """Values per log-mel frame (``n_mels * (1 + deltas) * stack``)."""
        return self.n_mels * (1 + self.deltas) * self.stack


CAUSAL_CONTEXTS = ("causal_conv", "gru")
"""Context networks whose output at frame t depends on frames up to t only."""


@dataclass(kw_only=True)
class TransformerConfig:
    """The context network: conv positional embedding then Transformer layers, or Conformer layers."""

    kind: Literal["transformer", "conformer", "causal_conv", "gru"] = "transformer"
    """``transformer``: wav2vec 2.0's (conv positional embedding, then Transformer layers);
    ``conformer``: macaron Conformer layers with attention-side positions (``position``)
    and a depthwise convolution (``conv_kernel``), the encoder of wav2vec 2.0-Conformer,
    w2v-BERT and BEST-RQ (FAMILY.md section 5). The conformer has no conv positional
    embedding: ``pos_conv_*`` only size the unused one of Hugging Face's exports.
    ``causal_conv``: wav2vec 1.0's context network, ``num_layers`` causal convolutions of
    kernels 2, 3, ... (FAMILY.md section 9); ``gru``: unidirectional GRU layers (APC,
    section 10). Neither reads a frame after t (the causal convs' GroupNorms take, as
    fairseq's, their statistics over the utterance), so they read the front end's frames as
    they are (no LayerNorm/Linear projection: ``dropout_input`` only), and they have no
    heads, FFN, positions or LayerDrop (``layerdrop`` is ignored, with a warning)."""
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
    activation: Literal["gelu", "relu"] = "gelu"
    """``causal_conv`` only: after each convolution (ReLU in wav2vec 1.0, GELU in vq-wav2vec)."""
    absolute_positions: bool = False
    """``transformer`` only: fixed sinusoidal absolute positions added to the input instead
    of the conv positional embedding (Mockingjay and TERA, FAMILY.md section 10)."""
    position: Literal["relative", "rotary"] = "relative"
    """Conformer only: ``relative``: Transformer-XL relative positions in every attention
    (sinusoids through ``linear_pos``, learned biases u and v; fairseq ``rel_pos``, Hugging
    Face ``position_embeddings_type="relative"``); ``rotary``: rotary embeddings of the
    attention input (fairseq ``rope``, Hugging Face ``"rotary"``, base 10000)."""
    relative_bias: Literal["none", "gated"] = "none"
    """Transformer only: ``gated``: WavLM's gated relative position bias (FAMILY.md section 2):
    a learned bias per head and log-spaced distance bucket, added to every layer's attention
    scores after a gate computed from that layer's input; the conv positional embedding
    stays. ``none``: wav2vec 2.0's and HuBERT's attention."""
    relative_buckets: int = 320
    """Gated bias only: distance buckets, half for each direction (WavLM's 320)."""
    relative_max_distance: int = 800
    """Gated bias only: frames from which distances share the last bucket (Hugging Face's
    800; UniLM's code defaults to 1280: a checkpoint's own value is what counts)."""

    @property
    def causal(self) -> bool:
        """Whether frame t's output reads frames up to t only (causal_conv: but for its
        GroupNorms' per-utterance statistics, as fairseq's)."""
        return self.kind in CAUSAL_CONTEXTS

    def __post_init__(self) -> None:
        if self.kind not in ("transformer", "conformer", *CAUSAL_CONTEXTS):
            raise ValueError(
                f"model.transformer.kind: expected 'transformer' or 'conformer', got {self.kind!r}; the causal "
                f"context networks are {' and '.join(repr(k) for k in CAUSAL_CONTEXTS)}"
            )
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"model.transformer.activation: expected 'gelu' or 'relu', got {self.activation!r}")
        if self.causal:
            self._check_causal()
            return
        if self.position not in ("relative", "rotary"):
            raise ValueError(
                f"model.transformer.position: expected 'relative' or 'rotary', got {self.position!r}"
            )
        if self.relative_bias not in ("none", "gated"):
            raise ValueError(
                f"model.transformer.relative_bias: expected 'none' or 'gated', got {self.relative_bias!r}"
            )
        if self.relative_bias == "gated":
            if self.kind != "transformer":
                raise ValueError(
                    "model.transformer.relative_bias='gated' (WavLM's) is a Transformer option; the conformer "
                    "has its own relative positions (model.transformer.position)"
                )
            if self.relative_buckets < 4 or self.relative_buckets % 2:
                raise ValueError(
                    f"model.transformer.relative_buckets: expected an even number >= 4, got {self.relative_buckets}"
                )
            if self.relative_max_distance <= self.relative_buckets // 4:
                raise ValueError(
                    f"model.transformer.relative_max_distance ({self.relative_max_distance}) must exceed the exact "
                    f"range of relative_buckets / 4 ({self.relative_buckets // 4}) frames"
                )
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"model.transformer.conv_kernel: expected an odd value >= 1, got {self.conv_kernel}")
        if self.activation != "gelu":
            raise ValueError(f"model.transformer.activation: only causal_conv takes {self.activation!r}, got kind {self.kind!r}")
        if self.absolute_positions and self.kind != "transformer":
            raise ValueError(f"model.transformer.absolute_positions: only the transformer kind has them, got {self.kind!r}")
        if self.absolute_positions and self.pos_conv_depth > 1:
            raise ValueError("model.transformer.absolute_positions replaces the conv positional embedding; "
                             f"pos_conv_depth={self.pos_conv_depth} would stack convolutions that never run")
        if self.alibi and self.relative_bias != "none":
            raise ValueError("model.transformer.alibi and relative_bias='gated' are two relative position biases "
                             "(data2vec 2.0's and WavLM's); choose one")
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

    def _check_causal(self) -> None:
        for name in ("num_layers", "dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.transformer.{name}: expected > 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.transformer.dropout: expected in [0, 1), got {self.dropout}")
        if self.layerdrop:
            # A warning, not an error: fine-tuning configs carry the Transformer's LayerDrop
            # into whatever encoder they fine-tune.
            warnings.warn(f"model.transformer.layerdrop={self.layerdrop}: ignored, the {self.kind} context network "
                          "has no LayerDrop", stacklevel=3)
        if self.absolute_positions:
            raise ValueError(f"model.transformer.absolute_positions: the {self.kind} context network has no positions")
        if self.activation != "gelu" and self.kind != "causal_conv":
            raise ValueError(f"model.transformer.activation: only causal_conv takes {self.activation!r}, got kind {self.kind!r}")


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




@dataclass(kw_only=True)
class HubertConfig:
    """HuBERT's targets (FAMILY.md section 1; ``models.hubert``): the k-means cluster id of
    each frame, made offline by ``jobs.label`` (MFCC features in the first iteration, a
    layer of the previous iteration's model afterwards: the ``label`` section) and given
    with every batch. The model scores each cluster by the cosine between a projection of
    the context (``model.final_dim`` wide) and a learned embedding of the cluster, divided
    by ``model.loss.logit_temp`` (0.1); the loss is the cross-entropy over masked frames,
    plus ``model.loss.feature_penalty_weight`` times the mean square of the features."""

    clusters: int = 100
    """K: clusters of the labelling and classes of the model (the labelling job fits this
    many; pretraining refuses labels with another number). The loss's chance level is ln(K).
    HuBERT BASE: 100 on MFCC (iteration 1), 500 on layer 6 of iteration 1 (iteration 2)."""

    def __post_init__(self) -> None:
        if not 2 <= self.clusters <= 32767:
            raise ValueError(f"model.hubert.clusters: expected 2..32767 (ids are stored as int16), got {self.clusters}")


@dataclass(kw_only=True)
class W2vBertConfig:
    """w2v-BERT (FAMILY.md section 6; ``models.w2v_bert``): wav2vec 2.0's contrastive loss (and
    its diversity loss) on the output of the first ``contrastive_layers`` Conformer blocks
    (the contrastive module), and a masked-LM loss on the output of the remaining blocks
    (the masked-LM module): at every masked frame, a linear head predicts the id the
    quantizer (``model.quantizer``) gives the unmasked frame, cross-entropy averaged over
    the quantizer's groups. Total loss per masked frame: ``contrastive_weight`` x (contrastive
    + ``model.loss.diversity_weight`` x diversity + ``model.loss.feature_penalty_weight`` x
    penalty) + ``mlm_weight`` x masked-LM."""

    contrastive_layers: int = 0
    """N, the Conformer blocks of the contrastive module; the other ``model.transformer.num_layers``
    - N form the masked-LM module. 0: a third of the blocks (at least 1), fairseq2's split
    (8 + 16 of 24 in its 600m, 4 + 8 of 12 in its 300m)."""
    contrastive_weight: float = 1.0
    """Weight of the wav2vec 2.0 loss (fairseq2's ``w2v2_loss_weight`` 1)."""
    mlm_weight: float = 1.0
    """Weight of the masked-LM cross-entropy (fairseq2's ``bert_loss_weight`` 1)."""

    def __post_init__(self) -> None:
        if self.contrastive_layers < 0:
            raise ValueError(f"model.w2v_bert.contrastive_layers: expected >= 0 (0: a third), got "
                             f"{self.contrastive_layers}")
        for name in ("contrastive_weight", "mlm_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.w2v_bert.{name}: expected >= 0, got {getattr(self, name)}")
        if self.contrastive_weight == 0 and self.mlm_weight == 0:
            raise ValueError("model.w2v_bert: contrastive_weight and mlm_weight are both 0: nothing to learn")


@dataclass(kw_only=True)
class JustConfig:
    """JUST (FAMILY.md section 8; ``models.just``): w2v-BERT (``model.w2v_bert``, ``quantizer``,
    ``loss``) plus a CTC loss on characters from a head on the masked-LM module, counted on
    the utterances of ``data.train_uri`` that have a transcript. Total per masked frame: the
    w2v-BERT loss + ``ctc_weight`` x the CTC loss per character of the batch's labelled
    utterances. The characters are ``finetune.vocab`` (``finetune.vocab_from_data``: those of
    the transcripts, a joint grapheme vocabulary over the languages), as fine-tuning's."""

    ctc_weight: float = 1.0
    """Weight of the supervised loss (JUST's paper: the supervised and unsupervised losses
    summed with weights; its values are [unverified] in FAMILY.md)."""
    vocab_size: int = 0
    """CTC tokens (the blank, ``|`` and the characters of ``finetune.vocab``): set when the run
    starts (``pipeline.train.just.resolve_config``) and saved with the config, so a
    checkpoint rebuilds its head without the data; 0 until then."""

    def __post_init__(self) -> None:
        if self.ctc_weight < 0:
            raise ValueError(f"model.just.ctc_weight: expected >= 0, got {self.ctc_weight}")
        if self.vocab_size < 0:
            raise ValueError(f"model.just.vocab_size: expected >= 0 (0: set from finetune.vocab), got {self.vocab_size}")


@dataclass(kw_only=True)
class MixingConfig:
    """WavLM's denoising (FAMILY.md section 2, UniSpeech-SAT's ``mixing_collated_audios``):
    with probability ``prob`` an utterance of the batch gets an overlay: a segment of another
    utterance of the same batch (or, with ``noise_prob``, of a clip of the noise set), of a
    random length up to ``max_ratio`` of the utterance, at random positions in both, scaled
    to an energy ratio (SNR) drawn uniformly in dB. The targets stay the primary utterance's:
    the model learns to predict its speaker's units through the interference."""

    prob: float = 0.0
    """Probability that an utterance is mixed (0: off; WavLM 0.2)."""
    max_ratio: float = 0.5
    """Longest overlay, as a share of the primary utterance's length (UniSpeech-SAT's T // 2)."""
    snr_min: float = -5.0
    """Lowest primary-to-overlay energy ratio (dB) of an utterance overlay."""
    snr_max: float = 5.0
    """Highest ratio (dB) of an utterance overlay (UniSpeech-SAT 5; ESPnet's recipe 20)."""
    noise_uri: str = ""
    """A prepared dataset of noise clips (``jobs.prepare`` of a directory of noise files);
    empty: overlays come from the batch only."""
    noise_prob: float = 0.0
    """Share of the mixed utterances whose overlay is noise rather than speech (needs ``noise_uri``)."""
    noise_snr_min: float = -5.0
    """Lowest ratio (dB) of a noise overlay."""
    noise_snr_max: float = 20.0
    """Highest ratio (dB) of a noise overlay."""

    def __post_init__(self) -> None:
        for name in ("prob", "noise_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"model.mixing.{name}: expected in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.max_ratio <= 1.0:
            raise ValueError(f"model.mixing.max_ratio: expected in (0, 1], got {self.max_ratio}")
        for lo, hi in (("snr_min", "snr_max"), ("noise_snr_min", "noise_snr_max")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(
                    f"model.mixing.{lo} ({getattr(self, lo)}) must be <= model.mixing.{hi} ({getattr(self, hi)})"
                )
        if self.noise_prob > 0 and not self.noise_uri:
            raise ValueError("model.mixing.noise_prob > 0 needs model.mixing.noise_uri (a prepared dataset of noise)")


@dataclass(kw_only=True)
class Wav2vecConfig:
    """wav2vec (1.0)'s objective, also vq-wav2vec's (FAMILY.md section 9; ``models.wav2vec1``):
    from the context at frame t, predict the features of frames t + offset + s, s = 0 ..
    steps - 1, each against ``num_negatives`` features of other frames of the utterance,
    with a binary cross-entropy summed over the true and the sampled pairs."""

    prediction_steps: int = 12
    """Future frames predicted from every context frame (one projection per step)."""
    num_negatives: int = 10
    """Distractors per predicted frame, uniform over the other frames of its utterance."""
    offset: int = -1
    """Frames between the context and the first predicted frame; -1: fairseq's ``auto``,
    the front end's receptive field over its stride, rounded up (465 / 160 -> 3)."""
    dropout_context: float = 0.0
    """Dropout on the context before the step projections (fairseq ``dropout_agg``)."""
    dropout_predictions: float = 0.0
    """Dropout on the predictions (fairseq's ``dropout`` in its prediction model)."""

    def __post_init__(self) -> None:
        for name in ("prediction_steps", "num_negatives"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.wav2vec.{name}: expected >= 1, got {getattr(self, name)}")
        if self.offset < -1:
            raise ValueError(f"model.wav2vec.offset: expected -1 (auto) or >= 0, got {self.offset}")
        for name in ("dropout_context", "dropout_predictions"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.wav2vec.{name}: expected in [0, 1), got {getattr(self, name)}")


@dataclass(kw_only=True)
class VqWav2vecConfig:
    """vq-wav2vec's quantizer of the front end's features (FAMILY.md section 9): the context
    network reads, and the objective predicts, the quantized features. Its ids are the
    tokens of the second stage (``Wav2VecModel.tokens``)."""

    kind: Literal["gumbel", "kmeans"] = "gumbel"
    """``gumbel``: a straight-through Gumbel softmax over an MLP's logits; ``kmeans``: the
    nearest codeword of a grouped projection, with a straight-through gradient and the
    codebook and commitment losses."""
    groups: int = 2
    entries: int = 320
    """Codewords per group (320 x 320 = 102,400 token pairs)."""
    shared_codebook: bool = True
    """One codebook for every group (fairseq ``--combine-groups``)."""
    proj_depth: int = 2
    """gumbel: layers of the logit MLP (fairseq ``--vq-depth``; the hidden width is twice the input's)."""
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    """gumbel: ``max(start * decay**step, end)`` per update (2, 0.5, 0.999995)."""
    diversity_weight: float = 0.0
    """gumbel: weight of ``(G*V - perplexity) / (G*V)``; 0 as the README's command (no ``--loss-weights``)."""
    gamma: float = 0.25
    """kmeans: weight of the commitment term ``||z - sg(q)||^2`` beside ``||sg(z) - q||^2``."""
    kmeans_weight: float = 1.0
    """kmeans: weight of those losses per predicted frame (the README's ``--loss-weights [1]``)."""
    codebook_std: float = 0.01
    """kmeans: the codewords start as N(0, std^2) draws (fairseq: 0.01; the vectors they
    quantize come out of a GroupNorm, about unit scale)."""

    def __post_init__(self) -> None:
        if self.kind not in ("gumbel", "kmeans"):
            raise ValueError(f"model.vq_wav2vec.kind: expected 'gumbel' or 'kmeans', got {self.kind!r}")
        if self.groups < 1 or self.entries < 2 or self.proj_depth < 1:
            raise ValueError(
                f"model.vq_wav2vec: expected groups >= 1, entries >= 2 and proj_depth >= 1, got {self.groups}, "
                f"{self.entries} and {self.proj_depth}"
            )
        for name in ("diversity_weight", "gamma", "kmeans_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.vq_wav2vec.{name}: expected >= 0, got {getattr(self, name)}")
        if self.codebook_std <= 0:
            raise ValueError(f"model.vq_wav2vec.codebook_std: expected > 0, got {self.codebook_std}")


@dataclass(kw_only=True)
class ApcConfig:
    """Autoregressive predictive coding (FAMILY.md section 10; ``models.reconstruction``): from
    the context at frame t, a Linear postnet predicts the log-mel frame t + ``shift``; L1."""

    shift: int = 5
    """Frames ahead (s3prl ``n_future``)."""

    def __post_init__(self) -> None:
        if self.shift < 1:
            raise ValueError(f"model.apc.shift: expected >= 1, got {self.shift}")


@dataclass(kw_only=True)
class TeraConfig:
    """Mockingjay / TERA's alterations of the log-mel input (FAMILY.md section 10;
    ``models.reconstruction``); the model reconstructs the clean frames at the altered
    positions (L1). Time spans are ``model.mask`` (prob, length, min_masks), per utterance
    zeroed, replaced by other frames or kept; Mockingjay is TERA without the frequency band
    and the noise."""

    zero_prob: float = 0.8
    """Share of utterances whose time spans are zeroed."""
    replace_prob: float = 0.1
    """Share whose spans are replaced by other frames of the utterance (the rest stay as they are)."""
    freq_width: float = 0.0
    """Widest frequency band zeroed in every utterance, as a share of the channels (TERA: 0.2;
    the width is drawn from 0 .. that many channels)."""
    noise_prob: float = 0.0
    """Share of utterances that get Gaussian noise on every frame (TERA's magnitude alteration)."""
    noise_std: float = 0.2

    def __post_init__(self) -> None:
        for name in ("zero_prob", "replace_prob", "freq_width", "noise_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"model.tera.{name}: expected in [0, 1], got {getattr(self, name)}")
        if self.zero_prob + self.replace_prob > 1.0:
            raise ValueError(
                f"model.tera.zero_prob + model.tera.replace_prob must be <= 1, got {self.zero_prob} + {self.replace_prob}"
            )
        if self.noise_std < 0:
            raise ValueError(f"model.tera.noise_std: expected >= 0, got {self.noise_std}")


@dataclass(kw_only=True)
class VqBertConfig:
    """vq-wav2vec's second stage (Baevski et al. 2019, section 3.3; ``models.vq_bert``): a BERT
    on the tokens of a vq-wav2vec model. ``jobs.label`` with ``label.features=tokens`` turns
    every frame's G codeword ids into one token of a vocabulary of the ``vocab - 1`` pairs
    most frequent in its sample, the last id standing for every other pair (fairseq's
    recipe builds a dictionary of the ``g0-g1`` strings the same way). The model embeds the
    tokens, masks spans (``model.mask``: the paper's starts at p = 0.05 of the tokens, 10
    tokens each, is ``mask.prob`` 0.5, ``mask.length`` 10), replaces masked tokens BERT's
    way (``[MASK]``, a random token, or kept) and predicts the masked tokens' ids with a
    cross-entropy over the vocabulary."""

    vocab: int = 16384
    """K: tokens of the vocabulary, the unknown-pair token included (ids are stored as int16).
    The paper's Gumbel model uses about 13.5k of its 102,400 pairs (k-means about 23k)."""
    stride: int = 160
    """Samples per token: the tokeniser's frame stride (vq-wav2vec: 10 ms at 16 kHz); the
    label join checks it against the label set's."""
    random_token_prob: float = 0.1
    """Share of the masked tokens replaced by a random token instead of ``[MASK]`` (BERT, fairseq: 0.1)."""
    leave_unmasked_prob: float = 0.1
    """Share of the masked tokens left as they are (still predicted; BERT, fairseq: 0.1)."""
    scale_embedding: bool = True
    """Token embeddings initialised at std D^-0.5 and scaled by sqrt(D): unit spread per channel,
    level with the fixed sinusoids the Transformer adds (Vaswani et al.; fairseq's transformer
    with sinusoidal positions). False: RoBERTa's std 0.02, unscaled, which suits RoBERTa's
    learned positions (they start as small); under the presets' sinusoids, tokens at std 0.02
    are about 3% of the Transformer's input, and the laptop BERT learned little beyond the
    tokens' frequencies (masked accuracy 0.13 against 0.22 scaled, on the same tokens and budget)."""
    tie_embedding: bool = True
    """The LM head's output weights are the input embedding (RoBERTa, fairseq's ``masked_lm``);
    False gives the head a matrix of its own."""

    def __post_init__(self) -> None:
        if not 2 <= self.vocab <= 32767:
            raise ValueError(f"model.vq_bert.vocab: expected 2..32767 (ids are stored as int16), got {self.vocab}")
        if self.stride < 1:
            raise ValueError(f"model.vq_bert.stride: expected >= 1 samples, got {self.stride}")
        for name in ("random_token_prob", "leave_unmasked_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"model.vq_bert.{name}: expected in [0, 1], got {getattr(self, name)}")
        if self.random_token_prob + self.leave_unmasked_prob > 1.0:
            raise ValueError("model.vq_bert: random_token_prob + leave_unmasked_prob must be <= 1")


OBJECTIVES = (
    "wav2vec2", "best_rq", "hubert", "wav2vec", "vq_wav2vec", "apc", "tera", "data2vec", "data2vec2", "vq_bert",
    "w2v_bert", "just",
)
"""What a pretraining model learns to do (``model.objective``)."""
FUTURE_OBJECTIVES = ("wav2vec", "vq_wav2vec", "apc")
"""Objectives that predict frames after t from the context at t: they need a causal context network."""
LOGMEL_OBJECTIVES = ("apc", "tera")
"""Objectives that reconstruct the log-mel front end's frames."""
TARGET_HOP = 160
"""Samples between the log-mel frames that targets are computed from (10 ms)."""


@dataclass(kw_only=True)
class ModelConfig:
    """A pretraining model: a front end, a context network and an objective.

    ``objective``: ``wav2vec2`` (contrastive over a Gumbel quantizer's codes: ``quantizer``,
    ``loss``), ``best_rq`` (masked prediction of random-projection codes: ``best_rq``),
    ``hubert`` (masked prediction of k-means labels made by ``jobs.label``: ``hubert``;
    WavLM is HuBERT with ``mixing`` and ``transformer.relative_bias='gated'``),
    ``wav2vec`` (binary contrastive prediction of future features: ``wav2vec``),
    ``vq_wav2vec`` (the same on quantized features: ``wav2vec``, ``vq_wav2vec``), ``apc``
    (autoregressive prediction of a future log-mel frame: ``apc``), ``tera`` (reconstruction
    of altered log-mel frames, Mockingjay and TERA: ``mask``, ``tera``), ``data2vec`` /
    ``data2vec2`` (regression to an EMA teacher: ``data2vec``), ``vq_bert`` (vq-wav2vec's
    second stage: a BERT on the tokens ``jobs.label`` made with a vq-wav2vec model,
    ``label.features=tokens``: ``vq_bert``, ``mask``, ``transformer``), ``w2v_bert``
    (wav2vec 2.0's loss on the first Conformer blocks, masked prediction of its quantizer's
    ids on the last: ``w2v_bert``, ``quantizer``, ``loss``), ``just`` (w2v-BERT plus CTC on the
    utterances with transcripts: ``w2v_bert``, ``just``).
    """

    objective: Literal[
        "wav2vec2", "best_rq", "hubert", "wav2vec", "vq_wav2vec", "apc", "tera", "data2vec", "data2vec2", "vq_bert",
        "w2v_bert", "just",
    ] = "wav2vec2"
    """The pretraining objective. wav2vec2, best_rq and hubert train with any front end and context
    network; wav2vec, vq_wav2vec and apc predict the future, so they need a causal context
    network (``transformer.kind`` causal_conv or gru); apc and tera reconstruct log-mel
    frames, so they need the log-mel front end; data2vec and data2vec2 regress a teacher's
    Transformer layers, so they need ``transformer.kind`` transformer; w2v_bert splits a
    Conformer into its two modules, so it needs ``transformer.kind`` conformer of 2 blocks or more
    (and so does just, which is w2v_bert with a CTC head)."""
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    encoder: FeatureEncoderConfig = field(default_factory=FeatureEncoderConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    best_rq: BestRqConfig = field(default_factory=BestRqConfig)
    hubert: HubertConfig = field(default_factory=HubertConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    wav2vec: Wav2vecConfig = field(default_factory=Wav2vecConfig)
    vq_wav2vec: VqWav2vecConfig = field(default_factory=VqWav2vecConfig)
    apc: ApcConfig = field(default_factory=ApcConfig)
    tera: TeraConfig = field(default_factory=TeraConfig)
    data2vec: Data2VecConfig = field(default_factory=Data2VecConfig)
    vq_bert: VqBertConfig = field(default_factory=VqBertConfig)
    w2v_bert: W2vBertConfig = field(default_factory=W2vBertConfig)
    just: JustConfig = field(default_factory=JustConfig)
    final_dim: int = 256
    """Width of the space where context and quantized targets are compared."""
    dropout_input: float = 0.1
    """Dropout on the projected features before masking."""
    dropout_features: float = 0.1
    """Dropout on the unmasked latents that feed the quantizer."""
    final_dropout: float = 0.0
    """Dropout on the context vectors before the CTC head (fairseq ``final_dropout``, Hugging
    Face ``final_dropout``): fine-tuning's, and JUST's CTC head's in pretraining."""

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
        if self.mixing.prob > 0 and self.objective != "hubert":
            raise ValueError(
                f"model.mixing.prob={self.mixing.prob}: mixing keeps the primary utterance's targets, which only "
                f"given labels allow (model.objective=hubert); model.objective is {self.objective!r}"
            )
        if self.objective in FUTURE_OBJECTIVES and not self.transformer.causal:
            raise ValueError(
                f"model.objective={self.objective}: it predicts frames after t from the context at t, which must not "
                f"see them; model.transformer.kind must be one of {list(CAUSAL_CONTEXTS)}, got {self.transformer.kind!r}"
            )
        if self.objective in LOGMEL_OBJECTIVES and self.frontend.kind != "logmel":
            raise ValueError(
                f"model.objective={self.objective}: it reconstructs the log-mel front end's frames; "
                f"model.frontend.kind must be 'logmel', got {self.frontend.kind!r}"
            )
        if self.objective == "vq_wav2vec" and self.frontend_dim % self.vq_wav2vec.groups:
            raise ValueError(
                f"model.vq_wav2vec.groups ({self.vq_wav2vec.groups}) must divide the front end's width "
                f"({self.frontend_dim}): each group quantizes its share of the features"
            )
        if self.objective in ("data2vec", "data2vec2"):
            self._check_data2vec()
        if self.objective in ("w2v_bert", "just"):
            self._check_w2v_bert()
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
        if self.objective == "data2vec2" and tr.relative_bias != "none":
            raise ValueError(f"{where}: the student sees only its unmasked frames, which WavLM's bucketed "
                             "relative bias (model.transformer.relative_bias='gated') does not place; use alibi")
        if self.objective == "data2vec" and d2v.clones != 1:
            raise ValueError(f"model.data2vec.clones: data2vec 1.0 has none (data2vec2 does), got {d2v.clones}")

    def _check_w2v_bert(self) -> None:
        tr = self.transformer
        if tr.kind != "conformer":
            raise ValueError(f"model.objective={self.objective}: its contrastive and masked-LM modules are the "
                             f"first and the last blocks of a Conformer; expected model.transformer.kind 'conformer', got {tr.kind!r}")
        if not 1 <= self.w2v_bert_contrastive_layers < tr.num_layers:
            raise ValueError(
                f"model.w2v_bert.contrastive_layers (resolved to {self.w2v_bert_contrastive_layers}) must take at least "
                f"one of model.transformer.num_layers ({tr.num_layers}) blocks and leave the masked-LM module one"
            )

    @property
    def w2v_bert_contrastive_layers(self) -> int:
        """w2v-BERT's resolved contrastive module depth (``model.w2v_bert.contrastive_layers``; 0: a third)."""
        return self.w2v_bert.contrastive_layers or max(1, round(self.transformer.num_layers / 3))

    @property
    def codevector_dim(self) -> int:
        """Resolved width of the concatenated codewords."""
        return self.quantizer.codevector_dim or self.final_dim

    @property
    def frame_stride(self) -> int:
        """Samples per model frame: the conv strides' product, or log-mel hop x stack (vq_bert:
        one frame per token, ``model.vq_bert.stride``)."""
        if self.objective == "vq_bert":
            return self.vq_bert.stride
        if self.frontend.kind == "logmel":
            return self.frontend.hop * self.frontend.stack
        return math.prod(int(s) for _, _, s in self.encoder.conv_layers)

    @property
    def label_classes(self) -> int:
        """Classes of the label set the model trains on (``jobs.label`` makes this many):
        HuBERT's clusters, or vq_bert's token vocabulary."""
        return self.vq_bert.vocab if self.objective == "vq_bert" else self.hubert.clusters

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


def hubert() -> ModelConfig:
    """HuBERT BASE as fairseq's ``hubert_base_librispeech`` (FAMILY.md section 1): wav2vec 2.0
    BASE's encoder (group-norm extractor, gradient scale 0.1, 12 post-LN layers of 768 with
    12 heads as in the code, LayerDrop 0.05), ~57% of frames masked (prob 0.8, spans of 10),
    cosine logits at temperature 0.1 in a 256-wide space, feature penalty 10, and the first
    iteration's 100 MFCC clusters (the second: 500 clusters of layer 6, ``label`` section)."""
    cfg = ModelConfig(objective="hubert")
    cfg.mask = MaskConfig(prob=0.8, length=10, min_masks=2)
    cfg.hubert = HubertConfig(clusters=100)
    cfg.final_dim = 256
    cfg.loss.logit_temp = 0.1
    cfg.loss.feature_penalty_weight = 10.0
    return cfg


def hubert_laptop() -> ModelConfig:
    """HuBERT at the laptop preset's size and with its settings that make a tiny model learn
    (layer-norm extractor, full encoder gradient, no feature penalty, spans of 5)."""
    cfg = laptop()
    cfg.objective = "hubert"
    cfg.mask.prob = 0.8  # with spans of 5: about HuBERT's 57% of frames masked
    cfg.hubert = HubertConfig(clusters=100)
    cfg.loss.logit_temp = 0.1
    return cfg


def wavlm() -> ModelConfig:
    """WavLM BASE (FAMILY.md section 2): HuBERT BASE with the gated relative position bias
    (320 buckets, 800 frames as Hugging Face's config) and utterance mixing (20% of the
    utterances, -5..5 dB, up to half their length); UniLM's masking defaults (0.65, 10)."""
    cfg = hubert()
    cfg.transformer.relative_bias = "gated"
    cfg.mask.prob = 0.65
    cfg.mixing = MixingConfig(prob=0.2, max_ratio=0.5, snr_min=-5.0, snr_max=5.0)
    return cfg


def wavlm_laptop() -> ModelConfig:
    """WavLM at the laptop size: ``hubert_laptop`` with the gated relative bias and mixing."""
    cfg = hubert_laptop()
    cfg.transformer.relative_bias = "gated"
    cfg.mixing = MixingConfig(prob=0.2, max_ratio=0.5, snr_min=-5.0, snr_max=5.0)
    return cfg


def wav2vec() -> ModelConfig:
    """wav2vec (1.0) as fairseq's README command (FAMILY.md section 9): 5 convs of 512 channels,
    (kernel, stride) (10,5), (8,4), (4,2) x 3, then two 1x1 convs (the code's default has
    three), GroupNorm, ReLU, log compression: one 512-d frame per 10 ms; a causal context
    network of 12 convs of 512 with kernels 2 .. 13; 12 steps from offset 3 (auto) against
    10 distractors; no dropout."""
    return ModelConfig(
        objective="wav2vec",
        encoder=FeatureEncoderConfig(
            conv_layers=[[512, 10, 5], [512, 8, 4]] + [[512, 4, 2]] * 3 + [[512, 1, 1]] * 2,
            mode="wav2vec", conv_bias=False, grad_mult=1.0, activation="relu",
        ),
        transformer=TransformerConfig(kind="causal_conv", num_layers=12, dim=512, dropout=0.0, layerdrop=0.0,
                                      activation="relu"),
        wav2vec=Wav2vecConfig(prediction_steps=12, num_negatives=10, offset=-1),
        dropout_input=0.0,
    )


def vq_wav2vec() -> ModelConfig:
    """vq-wav2vec with the Gumbel quantizer as fairseq's README command (FAMILY.md section 9):
    wav2vec's network with GELU and three 1x1 convs; 2 groups of 320 codewords from one
    shared codebook, logits from a 2-layer MLP, temperature 2 -> 0.5 (x 0.999995 per update),
    no diversity penalty."""
    cfg = wav2vec()
    cfg.objective = "vq_wav2vec"
    cfg.encoder.conv_layers = [[512, 10, 5], [512, 8, 4]] + [[512, 4, 2]] * 3 + [[512, 1, 1]] * 3
    cfg.encoder.activation = "gelu"
    cfg.transformer.activation = "gelu"
    cfg.vq_wav2vec = VqWav2vecConfig(kind="gumbel", groups=2, entries=320, shared_codebook=True, proj_depth=2,
                                     temperature=TemperatureConfig(start=2.0, end=0.5, decay=0.999995))
    return cfg


def vq_wav2vec_kmeans() -> ModelConfig:
    """vq-wav2vec with the k-means quantizer (the README: ``--vq-type kmeans --loss-weights [1]``,
    gamma 0.25)."""
    cfg = vq_wav2vec()
    cfg.vq_wav2vec.kind = "kmeans"
    cfg.vq_wav2vec.gamma = 0.25
    cfg.vq_wav2vec.kmeans_weight = 1.0
    return cfg


def _tiny_wav2vec(cfg: ModelConfig) -> ModelConfig:
    """wav2vec's layout at the laptop presets' width: 32-channel convs (10 ms frames), a
    causal context network of 6 convs of 64 (kernels 2 .. 7: 210 ms of context)."""
    cfg.encoder.conv_layers = [[32, kernel, stride] for _, kernel, stride in cfg.encoder.conv_layers]
    cfg.transformer.num_layers = 6
    cfg.transformer.dim = 64
    return cfg


def wav2vec_laptop() -> ModelConfig:
    """wav2vec at the laptop presets' width: what learns on the demo corpus within minutes of CPU.

    With the recipe's ReLU the features of this narrow network collapse within 150 updates
    (the loss sits at the base rate); GELU, vq-wav2vec's activation, keeps them alive."""
    cfg = _tiny_wav2vec(wav2vec())
    cfg.encoder.activation = "gelu"
    cfg.transformer.activation = "gelu"
    return cfg


def vq_wav2vec_laptop() -> ModelConfig:
    """vq-wav2vec (Gumbel) at the laptop presets' width; 4 groups choosing from one shared
    codebook of 32, a temperature that anneals within hundreds of updates (as ``laptop``'s),
    and the logits from one Linear with N(0, 1) weights (fairseq's default ``--vq-depth 1``,
    wav2vec 2.0's quantizer) instead of the recipe's 2-layer MLP.

    Why: the training choice is ``argmax(logits + Gumbel noise)``, whatever the temperature
    (it only shapes the straight-through gradient), and the noise's spread is 1.28. The
    MLP's default initialisation gives logits that vary by 0.05 between frames of the
    log-compressed features, so at first 4% of the choices follow the input (1 in 32 by
    chance): the targets are noise, the loss cannot leave its chance level, and within a
    few thousand updates the codebook collapses to one codeword (perplexity 1, probe worse
    than random weights). The recipe has 400k updates to outgrow that; the single N(0, 1)
    Linear varies by 1.6, a quarter of the choices follow the input from the first update
    and the loss leaves chance within 500 updates. A diversity penalty does not help: it
    is met by flat logits, i.e. by pure noise.

    4 groups rather than the recipe's 2: each group settles on a handful of codewords (code
    perplexity 5-9 of 32) in a few thousand updates, and the context network reads nothing but the choices; 4 choices per
    frame took the objectives benchmark's probe from 70.7% to 64.1% CER at 300 CPU-s."""
    cfg = _tiny_wav2vec(vq_wav2vec())
    cfg.vq_wav2vec.groups = 4
    cfg.vq_wav2vec.entries = 32
    cfg.vq_wav2vec.temperature.decay = 0.999
    cfg.vq_wav2vec.proj_depth = 1
    return cfg


def vq_wav2vec_kmeans_laptop() -> ModelConfig:
    """vq-wav2vec (k-means) at the laptop presets' width; 2 groups of 32 codewords, the codewords
    drawn at the scale of the vectors they quantize (``codebook_std`` 1, not 0.01), and the
    k-means losses weighted 1/16, the recipe's weight per frame at this width.

    Why: the codewords quantize a GroupNorm's output, about unit scale per channel. Drawn at
    0.01, every codeword sits at the origin as the frames see it: a frame's nearest one is
    whichever points most its way, the quantized targets are near zero (the binary loss
    starts at 11 ln 2 = 7.6, every logit 0), and within 50 updates every frame picks the
    same codeword in both groups, with or without the k-means losses: the loss sits at its
    chance level and the probe does worse than random weights (82.7% against 66.5%). Drawn
    at unit scale the codewords start among the frames. The k-means losses are a mean over
    the C channels, added once per true pair (12 per frame), so their pull on a frame's
    vector is ``kmeans_weight * 12 / C``: at the recipe's 512 channels that is 16 times
    weaker than at these 32, and at weight 1 the commitment pulls every frame onto one
    codeword within 100 updates here; 32 / 512 keeps the recipe's balance."""
    cfg = _tiny_wav2vec(vq_wav2vec_kmeans())
    cfg.vq_wav2vec.entries = 32
    cfg.vq_wav2vec.codebook_std = 1.0
    cfg.vq_wav2vec.kmeans_weight = cfg.frontend_dim / vq_wav2vec_kmeans().frontend_dim
    return cfg


def apc() -> ModelConfig:
    """APC as s3prl's recipe (FAMILY.md section 10): 80 log-mel channels every 10 ms,
    normalised per utterance, into 3 unidirectional GRU layers of 512 (residual from the
    second on, dropout 0.1 between them), a Linear postnet predicting frame t + 5."""
    cfg = ModelConfig(
        objective="apc",
        frontend=FrontendConfig(kind="logmel", n_mels=80, hop=160, window=400, stack=1, normalize=True),
        transformer=TransformerConfig(kind="gru", num_layers=3, dim=512, dropout=0.1, layerdrop=0.0),
        apc=ApcConfig(shift=5),
        dropout_input=0.0,
    )
    cfg.encoder.grad_mult = 1.0
    return cfg


def apc_laptop() -> ModelConfig:
    """APC at the laptop presets' width: 3 GRU layers of 64."""
    cfg = apc()
    cfg.transformer.dim = 64
    return cfg


def mockingjay() -> ModelConfig:
    """Mockingjay as s3prl's recipe (FAMILY.md section 10): 80 log-mel channels + deltas +
    delta-deltas every 10 ms, normalised per utterance; a post-LN Transformer of 3 layers,
    768 wide, 12 heads, FFN 3072, dropout 0.1, sinusoidal absolute positions; spans of 7
    frames on about 15% of the frames, per utterance 80% zeroed, 10% replaced, 10% kept;
    L1 against the 80 static channels at the spans."""
    cfg = ModelConfig(
        objective="tera",
        frontend=FrontendConfig(kind="logmel", n_mels=80, hop=160, window=400, stack=1, normalize=True, deltas=2),
    )
    cfg.transformer = TransformerConfig(
        kind="transformer", num_layers=3, dim=768, ffn_dim=3072, num_heads=12, layer_norm_first=False,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, layerdrop=0.0, absolute_positions=True,
    )
    cfg.encoder.grad_mult = 1.0
    cfg.mask = MaskConfig(prob=0.15, length=7, min_masks=0)
    cfg.tera = TeraConfig(zero_prob=0.8, replace_prob=0.1, freq_width=0.0, noise_prob=0.0)
    cfg.dropout_input = 0.1
    return cfg


def tera() -> ModelConfig:
    """TERA as s3prl's ``logMelBase-T-F-M`` (FAMILY.md section 10): Mockingjay's Transformer on
    80 log-mel channels (no deltas) with dropout 0.3, its time alteration, a frequency band
    of up to 20% of the channels zeroed in every utterance, and N(0, 0.2) noise on 15% of
    the utterances (the magnitude alteration); L1 at the altered time and frequency positions."""
    cfg = mockingjay()
    cfg.frontend.deltas = 0
    for name in ("dropout", "attention_dropout"):
        setattr(cfg.transformer, name, 0.3)
    cfg.dropout_input = 0.3
    cfg.tera = TeraConfig(zero_prob=0.8, replace_prob=0.1, freq_width=0.2, noise_prob=0.15, noise_std=0.2)
    return cfg


def _tiny_transformer(cfg: ModelConfig) -> ModelConfig:
    """The laptop presets' Transformer (2 layers of 64, 4 heads, FFN 128), no dropout."""
    cfg.transformer = TransformerConfig(
        kind="transformer", num_layers=2, dim=64, ffn_dim=128, num_heads=4, layerdrop=0.0, pos_conv_kernel=16,
        pos_conv_groups=4, dropout=0.0, attention_dropout=0.0, absolute_positions=True,
    )
    cfg.dropout_input = 0.0
    return cfg


def mockingjay_laptop() -> ModelConfig:
    """Mockingjay at the laptop presets' size."""
    return _tiny_transformer(mockingjay())


def tera_laptop() -> ModelConfig:
    """TERA at the laptop presets' size (its alterations as the recipe's)."""
    return _tiny_transformer(tera())


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


def vq_bert() -> ModelConfig:
    """vq-wav2vec's BERT BASE (the paper, section 4.3; fairseq's ``roberta_base`` on the
    tokens; FAMILY.md section 9 gives no BERT values): 12 post-LN layers of 768, FFN 3072,
    12 heads, dropout 0.1 (attention 0.1), spans of 10 tokens from p = 0.05 of the tokens
    (``mask.prob`` 0.5). fairseq's ``--mask-stdev 10`` varies the span length; here it is
    fixed at 10. Positions: fixed sinusoids (RoBERTa learns 512 positions; the tokens of an
    utterance are many more), so the token embedding is scaled to their level
    (``vq_bert.scale_embedding``)."""
    cfg = ModelConfig(objective="vq_bert")
    cfg.transformer = TransformerConfig(
        kind="transformer", num_layers=12, dim=768, ffn_dim=3072, num_heads=12, layer_norm_first=False,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, layerdrop=0.0, absolute_positions=True,
    )
    cfg.mask = MaskConfig(prob=0.5, length=10, min_masks=1)
    cfg.vq_bert = VqBertConfig(vocab=16384)
    cfg.dropout_input = 0.1
    return cfg


def vq_bert_laptop() -> ModelConfig:
    """vq-wav2vec's BERT at the laptop presets' size, on the tokens of ``vq_wav2vec_laptop``
    (4 groups of 32 codewords: a vocabulary of its 511 most frequent tuples and one token
    for the rest)."""
    cfg = _tiny_transformer(vq_bert())
    cfg.mask = MaskConfig(prob=0.5, length=5, min_masks=1)
    cfg.vq_bert.vocab = 512
    return cfg


def w2v_bert() -> ModelConfig:
    """w2v-BERT as fairseq2's ``600m`` architecture (FAMILY.md section 6): 80 normalised log-mel
    channels stacked x 2 (160 values per 20 ms frame; Google's paper subsamples with convs
    instead), 24 Conformer blocks of 1024 with 16 heads, FFN 4096, depthwise kernel 31,
    relative positions, post-norm, no dropout or LayerDrop; the first 8 blocks are the
    contrastive module, the last 16 the masked-LM module; spans of 10 at mask_prob 0.65
    (at least 2), a Gumbel quantizer of 1 codebook x 1024 entries of 1024 dims, temperature
    2 -> 0.1 (x 0.999995), 100 distractors at logit temperature 0.1, final_dim 768; both
    losses weighted 1. The log-mel front end has no weights, so no feature penalty."""
    return ModelConfig(
        objective="w2v_bert",
        frontend=FrontendConfig(kind="logmel", n_mels=80, hop=160, window=400, stack=2, normalize=True),
        encoder=FeatureEncoderConfig(grad_mult=1.0),
        transformer=TransformerConfig(
            kind="conformer", num_layers=24, dim=1024, ffn_dim=4096, num_heads=16, layer_norm_first=False,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, conv_kernel=31,
            position="relative",
        ),
        mask=MaskConfig(prob=0.65, length=10, min_masks=2),
        quantizer=QuantizerConfig(groups=1, entries=1024, codevector_dim=1024,
                                  temperature=TemperatureConfig(start=2.0, end=0.1, decay=0.999995)),
        loss=LossConfig(num_negatives=100, logit_temp=0.1, diversity_weight=0.1, feature_penalty_weight=0.0),
        w2v_bert=W2vBertConfig(contrastive_layers=8, contrastive_weight=1.0, mlm_weight=1.0),
        final_dim=768, dropout_input=0.0, dropout_features=0.0,
    )


def w2v_bert_laptop() -> ModelConfig:
    """w2v-BERT at ``best_rq_laptop``'s size: log-mel 80 x 4 (40 ms frames), 2 post-norm Conformer
    blocks of 64 (one per module), 1 codebook of 64 entries in a 32-wide space, 20
    distractors, spans of 3 frames (120 ms) at mask_prob 0.5, and a temperature that anneals
    within hundreds of updates (as ``laptop``'s)."""
    cfg = w2v_bert()
    cfg.frontend.stack = 4
    cfg.transformer = TransformerConfig(
        kind="conformer", num_layers=2, dim=64, ffn_dim=128, num_heads=4, layer_norm_first=False,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, conv_kernel=15,
        position="relative",
    )
    cfg.mask = MaskConfig(prob=0.5, length=3, min_masks=2)
    cfg.quantizer = QuantizerConfig(groups=1, entries=64, codevector_dim=32,
                                    temperature=TemperatureConfig(start=2.0, end=0.5, decay=0.999))
    cfg.loss.num_negatives = 20
    cfg.w2v_bert.contrastive_layers = 1
    cfg.final_dim = 32
    return cfg


def just() -> ModelConfig:
    """JUST at w2v-BERT's ``600m`` size (``w2v_bert``) with a CTC head on the masked-LM module,
    weighted 1 against the self-supervised losses (FAMILY.md section 8: the paper's weights
    and mixing are [unverified]; its RNN-T decoder is a CTC head here, ``models.just``)."""
    cfg = w2v_bert()
    cfg.objective = "just"
    cfg.just = JustConfig(ctc_weight=1.0)
    return cfg


def just_laptop() -> ModelConfig:
    """JUST at ``w2v_bert_laptop``'s size: one Conformer block per module, the CTC head on the
    second."""
    cfg = w2v_bert_laptop()
    cfg.objective = "just"
    cfg.just = JustConfig(ctc_weight=1.0)
    return cfg


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
    "vq_bert": vq_bert, "vq_bert_laptop": vq_bert_laptop, "w2v_bert": w2v_bert, "w2v_bert_laptop": w2v_bert_laptop,
    "just": just, "just_laptop": just_laptop,
}
