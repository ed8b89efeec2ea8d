"""data2vec 1.0 and 2.0: regression, at masked frames, to an EMA teacher's representations.

The student is wav2vec 2.0's encoder (``Wav2Vec2Encoder``: conv front end, projection,
mask embedding, Transformer). The teacher is a second copy of the context network
(``TransformerEncoder``: positional embedding, LayerNorm, layers; ALiBi in 2.0) that the
optimizer never sees (``requires_grad=False``): it reads the student's projected
features *unmasked* and gives, for every frame, the average of its top ``top_k`` layers'
feed-forward outputs (before the residual), each instance-normalised over time. After
every optimizer update the teacher moves towards the student,
``teacher <- d * teacher + (1 - d) * student``, with ``d`` rising linearly from
``ema_decay`` to ``ema_end_decay`` over ``ema_anneal_steps`` updates
(:func:`ema_decay`, :func:`ema_update_`). The training loop runs that update
(``pipeline.train.data2vec``); under ZeRO-3 it runs on each rank's shard of the
weights. The loss is the squared error summed over channels, times ``1/sqrt(D)``,
summed over masked frames; its count is the masked frames (FAMILY.md sections 3, 4).

data2vec 1.0 (:class:`Data2VecModel`; fairseq ``data2vec_audio.py``)::

    source (B, S) -> front end -> projection -> y (B, T, D)
    y -> teacher (unmasked, no grad) -> top-k FFN outputs -> instance norm, mean -> targets (B, T, D)
    y: masked frames -> mask embedding -> Transformer -> regression_head -> predictions (B, T, D)

The teacher's positional convolution is copied from the student at every update, not
averaged (``ema_layers_only``).

data2vec 2.0 (:class:`Data2Vec2Model`; fairseq ``data2vec2.py``): the efficiency devices.
Each utterance is cloned ``clones`` times (M), each clone with its own mask of exactly
``mask.prob`` of its frames; the teacher runs once per utterance and its targets serve
every clone. The student zeroes the masked frames, embeds positions over the whole
sequence, then *drops* the masked frames: its Transformer (with ALiBi, so kept frames
keep their true distances) sees only the unmasked half. A light conv decoder puts the
encoded frames back in place, noise at the masked ones, and predicts every frame::

    y (B, T, D) -> teacher -> targets (B, T, D) -> repeated M times (B*M, T, D)
    y -> M clones (B*M, T, D): masked frames zeroed -> positions -> kept frames (B*M, K, D)
      -> Transformer (ALiBi) -> decoder (noise at masked frames) -> predictions (B*M, T, D)

The whole context network is averaged into the teacher, positional convolutions and
ALiBi scales included. Nothing in a forward pass reads a tensor value on the host
unless the caller leaves ``num_kept`` to be counted.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.masking import compute_exact_span_mask, compute_span_mask
from models.transformer import ConvBlock, KeptFrames, TransformerEncoder
from models.wav2vec2 import Wav2Vec2Encoder, check_shape


class RegressionOutput(NamedTuple):
    """What a data2vec step logs or differentiates; all tensors, no host values.

    With data2vec 2.0's clones, B' = B * clones rows (clone-major within each utterance:
    rows ``b * M .. b * M + M - 1`` are utterance ``b``); B' = B for 1.0.
    """

    loss_sum: Tensor
    """() float32: the scaled squared error summed over channels and masked frames."""
    num_masked: Tensor
    """() long: masked frames (the loss's count)."""
    target_std: Tensor
    """() float32: std of the targets over masked frames, averaged over channels (collapse: near 0)."""
    prediction_std: Tensor
    """() float32: the same for the predictions."""
    predictions: Tensor
    """(B', T, D): the student's prediction of every frame (only masked ones count)."""
    targets: Tensor
    """(B', T, D) float32: the teacher's target of every frame."""
    last_hidden_state: Tensor
    """(B', T, D) the context network's output (2.0: (B', K, D), the kept frames only)."""
    mask_time_indices: Tensor
    """(B', T) bool: the masked frames."""
    padding_mask: Tensor | None
    """(B', T) bool frame padding (True = padded), None without padding."""
    row_loss_sum: Tensor
    """(B',) float32, detached: each row's part of ``loss_sum`` (its masked frames' errors),
    for the per-language losses."""


def ema_decay(updates: int, *, start: float, end: float, anneal_steps: int) -> float:
    """The teacher's decay for the EMA step after update number ``updates`` (1 = the first):
    linear from ``start`` (at 0) to ``end`` (at ``anneal_steps``), then ``end`` (fairseq's
    ``get_annealed_rate``, called with the count of updates done)."""
    if updates >= anneal_steps:
        return end
    return end - (end - start) * (1.0 - updates / anneal_steps)


@torch.no_grad()
def ema_update_(teacher: Sequence[Tensor], student: Sequence[Tensor], decay: float | Tensor,
                skip: Tensor | None = None) -> None:
    """``t <- decay * t + (1 - decay) * s`` for every pair, in place.

    ``skip`` (a 0-dim float tensor, 1.0 when the update was skipped for a non-finite loss)
    makes it ``t <- t``, decided on the device: the host never waits for the flag. A skipped
    update left the student as it was, so its values are finite and ``t * 1 + s * 0`` is
    ``t`` exactly. ``decay`` 0 copies the student.
    """
    if not teacher:
        return
    if len(teacher) != len(student):
        raise ValueError(f"ema_update_: {len(teacher)} teacher tensors for {len(student)} student tensors")
    device = teacher[0].device
    keep = torch.as_tensor(decay, dtype=torch.float32, device=device)
    if skip is not None:
        keep = torch.where(skip.to(device) > 0, torch.ones_like(keep), keep)
    take = 1.0 - keep
    for t, s in zip(teacher, student, strict=True):
        if t.shape != s.shape:
            raise ValueError(f"ema_update_: teacher tensor of shape {tuple(t.shape)} for a student one of "
                             f"{tuple(s.shape)}")
        t.mul_(keep.to(t.dtype)).addcmul_(s.to(t.dtype), take.to(t.dtype))


def instance_norm_over_time(x: Tensor, padding_mask: Tensor | None, eps: float = 1e-5) -> Tensor:
    """(B, T, D) -> (B, T, D) float32: each utterance's channels at zero mean and unit
    (biased) variance over its valid frames (``F.instance_norm``, which fairseq applies,
    over all frames: the same when nothing is padded)."""
    x = x.float()
    if padding_mask is None:
        return F.instance_norm(x.transpose(1, 2), eps=eps).transpose(1, 2)
    w = (~padding_mask).unsqueeze(-1).float()  # (B, T, 1)
    n = w.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, 1, 1)
    mean = (x * w).sum(dim=1, keepdim=True) / n  # (B, 1, D)
    var = ((x - mean).square() * w).sum(dim=1, keepdim=True) / n
    return (x - mean) * torch.rsqrt(var + eps) * w


def average_targets(layers: Sequence[Tensor], padding_mask: Tensor | None, *, instance_norm: bool) -> Tensor:
    """(B, T, D) float32: the mean of ``layers`` (each (B, T, D)), each instance-normalised first."""
    if not layers:
        raise ValueError("average_targets: no layers")
    out = None
    for layer in layers:
        y = instance_norm_over_time(layer, padding_mask) if instance_norm else layer.float()
        out = y if out is None else out + y
    assert out is not None
    return out / len(layers)


def masked_std(x: Tensor, weights: Tensor) -> Tensor:
    """() float32: per-channel std of ``x`` (..., D) over the positions where ``weights`` (...)
    is 1, averaged over channels (fairseq's ``compute_var``, which is a std)."""
    x = x.float().reshape(-1, x.shape[-1])  # (N, D)
    w = weights.float().reshape(-1, 1)  # (N, 1)
    n = w.sum().clamp(min=2.0)
    mean = (x * w).sum(dim=0) / n  # (D,)
    var = ((x - mean).square() * w).sum(dim=0) / (n - 1.0)
    return torch.sqrt(var + 1e-6).mean()


class Data2VecBase(nn.Module):
    """What data2vec 1.0 and 2.0 share: the student encoder, the EMA teacher, its targets
    and the regression loss.

    ``copied`` names the teacher parameters (relative to the context network) that are
    copied from the student at each update instead of averaged.
    """

    copied: tuple[str, ...] = ()

    def __init__(
        self,
        encoder: Wav2Vec2Encoder,
        *,
        top_k: int,
        instance_norm_targets: bool,
        loss_scale: float,
        ema: tuple[float, float, int],
        mask_prob: float,
        mask_length: int,
    ) -> None:
        super().__init__()
        if not isinstance(encoder.transformer, TransformerEncoder):
            raise ValueError("data2vec: the targets are Transformer layers' feed-forward outputs; "
                             "expected a TransformerEncoder context network")
        if not 1 <= top_k <= len(encoder.transformer.layers):
            raise ValueError(f"top_k: expected 1..{len(encoder.transformer.layers)}, got {top_k}")
        self.encoder = encoder
        self.teacher = copy.deepcopy(encoder.transformer).requires_grad_(False)
        self.top_k = top_k
        self.instance_norm_targets = instance_norm_targets
        self.loss_scale = loss_scale or 1.0 / math.sqrt(encoder.dim)
        self.ema_start, self.ema_end, self.ema_anneal_steps = ema
        self.mask_prob = mask_prob
        self.mask_length = mask_length

    # -- the teacher ---------------------------------------------------------------------

    def train(self, mode: bool = True) -> Data2VecBase:
        """The teacher always runs as in evaluation: no dropout, no LayerDrop."""
        super().train(mode)
        self.teacher.eval()
        return self

    def set_num_updates(self, step: int) -> None:
        """No schedule inside the model: the teacher's decay is applied by the loop's
        update hook (:meth:`ema_decay`)."""

    def ema_decay(self, updates: int) -> float:
        """The decay of the EMA step after update number ``updates`` (1-based)."""
        return ema_decay(updates, start=self.ema_start, end=self.ema_end, anneal_steps=self.ema_anneal_steps)

    def teacher_pairs(self) -> tuple[list[tuple[nn.Parameter, nn.Parameter]], list[tuple[nn.Parameter, nn.Parameter]]]:
        """(averaged, copied): (teacher, student) parameter pairs of the context network."""
        student = dict(self.encoder.transformer.named_parameters())
        averaged, copied = [], []
        for name, t in self.teacher.named_parameters():
            pair = (t, student[name])
            (copied if name.startswith(self.copied) else averaged).append(pair)
        return averaged, copied

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """The teacher becomes a copy of the student's context network (a model whose
        encoder was loaded from elsewhere starts its teacher from it)."""
        self.teacher.load_state_dict(self.encoder.transformer.state_dict())

    @torch.no_grad()
    def teacher_targets(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        """(B, T, D) float32 targets of the student's unmasked projected features ``x`` (B, T, D)."""
        layers = self.teacher.ffn_outputs(x, padding_mask)[-self.top_k:]
        return average_targets(layers, padding_mask, instance_norm=self.instance_norm_targets)

    # -- the student ---------------------------------------------------------------------

    def _features(self, source: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
        """(projected features (B, T, D) before the projection's dropout: the teacher's input,
        frame padding (B, T) or None, frame lengths (B,))."""
        features, frame_pad, lengths = self.encoder.extract_features(source, padding_mask)  # (B, T, C)
        proj = self.encoder.feature_projection
        return proj.linear(proj.norm(features)), frame_pad, lengths  # (B, T, D)

    def _regression(self, predictions: Tensor, targets: Tensor, mask: Tensor, hidden: Tensor,
                    padding: Tensor | None) -> RegressionOutput:
        # Every frame is scored (no boolean indexing: its size would need a host sync); the
        # mask then keeps the masked ones.
        err = (predictions.float() - targets).square().sum(dim=-1) * self.loss_scale  # (B', T)
        weights = mask.to(err.dtype)
        masked_err = err * weights  # (B', T)
        with torch.no_grad():
            target_std = masked_std(targets, weights)
            prediction_std = masked_std(predictions.detach(), weights)
            row_loss_sum = masked_err.sum(dim=1)  # (B',)
        return RegressionOutput(
            loss_sum=masked_err.sum(), num_masked=mask.long().sum(), target_std=target_std,
            prediction_std=prediction_std, predictions=predictions, targets=targets, last_hidden_state=hidden,
            mask_time_indices=mask, padding_mask=padding, row_loss_sum=row_loss_sum,
        )


class Data2VecModel(Data2VecBase):
    """data2vec 1.0: masked frames replaced by the mask embedding, a linear regression head;
    the teacher's positional convolution is copied from the student, not averaged."""

    copied = ("pos_conv.",)

    def __init__(
        self,
        encoder: Wav2Vec2Encoder,
        *,
        top_k: int,
        instance_norm_targets: bool,
        loss_scale: float,
        ema: tuple[float, float, int],
        mask_prob: float,
        mask_length: int,
        min_masks: int,
    ) -> None:
        super().__init__(encoder, top_k=top_k, instance_norm_targets=instance_norm_targets, loss_scale=loss_scale,
                         ema=ema, mask_prob=mask_prob, mask_length=mask_length)
        self.min_masks = min_masks
        self.regression_head = nn.Linear(encoder.dim, encoder.dim)

    def sample_masks(self, batch: int, num_frames: int, lengths: Tensor,
                     generator: torch.Generator | None = None) -> Tensor:
        """(B, T) bool spans of masked frames, drawn on ``lengths.device``."""
        return compute_span_mask(
            (batch, num_frames), mask_prob=self.mask_prob, mask_length=self.mask_length,
            min_masks=self.min_masks, lengths=lengths, generator=generator, device=lengths.device,
        )

    def forward(
        self,
        source: Tensor,
        padding_mask: Tensor | None = None,
        *,
        mask_time_indices: Tensor | None = None,
        generator: torch.Generator | None = None,
        layerdrop_generator: torch.Generator | None = None,
    ) -> RegressionOutput:
        """One pass over ``source`` (B, S); ``padding_mask`` (B, S) True = padded. Masks come
        from ``generator`` unless given (``mask_time_indices`` (B, T))."""
        y, frame_pad, lengths = self._features(source, padding_mask)
        batch, time, _ = y.shape
        if mask_time_indices is None:
            mask = self.sample_masks(batch, time, lengths, generator)
        else:
            check_shape("mask_time_indices", mask_time_indices, (batch, time))
            mask = mask_time_indices.to(device=y.device, dtype=torch.bool)
        if frame_pad is not None:
            mask = mask & ~frame_pad
        targets = self.teacher_targets(y.detach(), frame_pad)  # (B, T, D)
        x = self.encoder.apply_time_mask(self.encoder.feature_projection.dropout(y), mask)
        hidden = self.encoder.transformer(x, frame_pad, layerdrop_generator=layerdrop_generator)  # (B, T, D)
        return self._regression(self.regression_head(hidden), targets, mask, hidden, frame_pad)


class ConvDecoder(nn.Module):
    """data2vec 2.0's decoder (fairseq ``Decoder1d``): the encoded frames back at their
    positions, noise at the others, then ``num_layers`` :class:`ConvBlock` (each but the
    first with a residual) and a Linear back to the model width. (B, K, D) -> (B, T, D)."""

    def __init__(self, dim: int, *, decoder_dim: int, kernel: int, groups: int, num_layers: int,
                 input_dropout: float, noise_std: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ConvBlock(dim if i == 0 else decoder_dim, decoder_dim, kernel, groups) for i in range(num_layers)
        )
        self.proj = nn.Linear(decoder_dim, dim)
        self.dropout = nn.Dropout(input_dropout)
        self.noise_std = noise_std

    def forward(self, x: Tensor, keep: KeptFrames, num_frames: int, generator: torch.Generator | None = None) -> Tensor:
        batch, _, dim = x.shape
        x = self.dropout(x)
        index = keep.indices.unsqueeze(-1).expand(-1, -1, dim)  # (B, K, D)
        placed = x.new_zeros(batch, num_frames, dim).scatter(1, index, x)  # (B, T, D)
        is_kept = torch.zeros(batch, num_frames, dtype=torch.bool, device=x.device).scatter(
            1, keep.indices, ~keep.padding
        )  # (B, T)
        gen_device = generator.device if generator is not None else x.device
        noise = torch.randn(batch, num_frames, dim, generator=generator, device=gen_device).to(x.device, x.dtype)
        y = torch.where(is_kept.unsqueeze(-1), placed, noise * self.noise_std).transpose(1, 2)  # (B, D, T)
        for block in self.blocks:
            out = block(y)  # (B, C, T)
            y = out + y if out.shape[1] == y.shape[1] else out  # fairseq adds the residual where widths match
        return self.proj(y.transpose(1, 2))  # (B, T, D)


def kept_frames(mask: Tensor, padding: Tensor | None, num_kept: int | None = None) -> KeptFrames:
    """The frames of each row that are neither masked nor padding, in time order, as
    (B, K) indices; rows with fewer than K get filler marked as padding. ``num_kept`` = K,
    the most any row keeps; counted here (a host sync) when not given."""
    drop = mask if padding is None else mask | padding  # (B, T)
    if num_kept is None:
        num_kept = int((~drop).sum(dim=1).max())
    order = torch.argsort(drop.to(torch.uint8), dim=1, stable=True)  # kept frames first, in time order
    indices = order[:, :num_kept]  # (B, K)
    return KeptFrames(indices=indices, padding=drop.gather(1, indices))


def num_kept_frames(lengths: Sequence[int], mask_prob: float) -> int:
    """K of :func:`kept_frames` for rows of ``lengths`` valid frames under
    :func:`compute_exact_span_mask` (exactly ``floor(mask_prob * n)`` masked), on the host."""
    return max((n - math.floor(n * mask_prob) for n in lengths), default=0)


class Data2Vec2Model(Data2VecBase):
    """data2vec 2.0 (module doc): clones sharing one teacher pass, masked frames dropped
    from the student, a conv decoder; the whole context network averaged into the teacher."""

    copied = ()

    def __init__(
        self,
        encoder: Wav2Vec2Encoder,
        decoder: ConvDecoder,
        *,
        clones: int,
        mask_adjust: float,
        top_k: int,
        instance_norm_targets: bool,
        loss_scale: float,
        ema: tuple[float, float, int],
        mask_prob: float,
        mask_length: int,
    ) -> None:
        super().__init__(
            encoder, top_k=top_k, instance_norm_targets=instance_norm_targets, loss_scale=loss_scale, ema=ema,
            mask_prob=mask_prob, mask_length=mask_length,
        )
        if clones < 1:
            raise ValueError(f"clones: expected >= 1, got {clones}")
        self.decoder = decoder
        self.clones = clones
        self.mask_adjust = mask_adjust
        # Masked frames are zeroed and dropped, never replaced: the mask embedding stays
        # unused (and out of the optimizer); it is kept so the encoder fine-tunes as any other.
        self.encoder.mask_embedding.requires_grad_(False)

    def sample_masks(self, batch: int, num_frames: int, lengths: Tensor,
                     generator: torch.Generator | None = None) -> Tensor:
        """(B, T) bool: exactly ``floor(mask_prob * n)`` of each row's ``n`` frames, in spans
        (:func:`compute_exact_span_mask`). For clones, pass the repeated batch and lengths."""
        return compute_exact_span_mask(
            (batch, num_frames), mask_prob=self.mask_prob, mask_length=self.mask_length, adjust=self.mask_adjust,
            lengths=lengths, generator=generator, device=lengths.device,
        )

    def forward(
        self,
        source: Tensor,
        padding_mask: Tensor | None = None,
        *,
        mask_time_indices: Tensor | None = None,
        num_kept: int | None = None,
        generator: torch.Generator | None = None,
        layerdrop_generator: torch.Generator | None = None,
    ) -> RegressionOutput:
        """One pass over ``source`` (B, S) and its ``clones`` masked copies. Masks (B * M, T)
        come from ``generator`` unless given; ``num_kept`` is the most frames a clone keeps
        (:func:`num_kept_frames`; counted with a host sync when not given)."""
        y, frame_pad, lengths = self._features(source, padding_mask)  # (B, T, D)
        batch, time, _ = y.shape
        rows = batch * self.clones
        targets = self.teacher_targets(y.detach(), frame_pad).repeat_interleave(self.clones, dim=0)  # (B*M, T, D)
        pad = None if frame_pad is None else frame_pad.repeat_interleave(self.clones, dim=0)  # (B*M, T)
        if mask_time_indices is None:
            mask = self.sample_masks(rows, time, lengths.repeat_interleave(self.clones), generator)
        else:
            check_shape("mask_time_indices", mask_time_indices, (rows, time))
            mask = mask_time_indices.to(device=y.device, dtype=torch.bool)
        if pad is not None:
            mask = mask & ~pad
        x = self.encoder.feature_projection.dropout(y).repeat_interleave(self.clones, dim=0)  # (B*M, T, D)
        x = x.masked_fill(mask.unsqueeze(-1), 0.0)  # masked frames are zeros to the positional convolution
        keep = kept_frames(mask, pad, num_kept)
        hidden = self.encoder.transformer(x, pad, layerdrop_generator=layerdrop_generator, keep=keep)  # (B*M, K, D)
        predictions = self.decoder(hidden, keep, time, generator)  # (B*M, T, D)
        return self._regression(predictions, targets, mask, hidden, pad)
