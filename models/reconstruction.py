"""The generative objectives: APC and Mockingjay/TERA reconstruct log-mel frames (L1).

Both read the log-mel front end's frames (FAMILY.md section 10; s3prl's recipes) and
regress the clean frames: the static channels of each frame (with ``deltas`` the input
also carries derivatives; the targets are the log-mel channels alone), normalised per
utterance when the front end normalises. The loss is the absolute error summed over the
reconstructed values, its count the number of those values: a mean over values like
s3prl's ``L1Loss`` once the loop divides by the global count.

- APC (:class:`ApcModel`): a causal context network (GRU in the recipe) reads frames
  1 .. t; a Linear postnet predicts frame t + ``shift``. Every valid frame with a frame
  ``shift`` ahead counts. Beside the loss, ``baseline_sum`` is the error of predicting frame
  t + shift by frame t: the model must beat that to have learned anything.

      source -> log-mel x (B, T, C) -> context network -> h (B, T, D) -> postnet -> (B, T, M)
      L1( pred[t], x_static[t + shift] ) for t + shift < length

- Mockingjay/TERA (:class:`MaskedReconstructionModel`): the frames are altered
  (:class:`Alterations`, drawn before the forward) and a Transformer reconstructs the
  clean ones at the altered positions:
  time: spans of ``model.mask`` frames; per utterance the spans are zeroed (80%),
  replaced by other frames of the utterance (10%) or kept (10%); all their channels count;
  frequency (TERA): one band of 0 .. ``freq_width`` of the channels zeroed on every frame;
  its channels count on every valid frame;
  magnitude (TERA): N(0, ``noise_std``) added to every frame of a share of the utterances;
  nothing extra counts (s3prl).
  Beside the loss, ``baseline_sum`` is the error of predicting every value by its channel's
  mean over the utterance (0 after normalisation): what a model that learned nothing reaches.

      source -> log-mel x (B, T, C) -> alter -> projection -> Transformer -> h -> head -> (B, T, M)
      L1( pred, x_static ) at the altered (time, channel) positions

Neither loss has a chance level: the baselines are logged instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from models.masking import _rand, compute_span_mask, frame_padding_mask
from models.wav2vec2 import Wav2Vec2Encoder, check_shape


def static_channels(frames: Tensor, *, n_mels: int, deltas: int, stack: int) -> Tensor:
    """(B, T, stack * (1 + deltas) * n_mels) log-mel frames -> (B, T, stack * n_mels): the
    log-mel channels without their derivatives (:class:`models.frontends.LogMelFrontend`'s layout)."""
    if not deltas:
        return frames
    batch, time, _ = frames.shape
    per = frames.view(batch, time, stack, 1 + deltas, n_mels)  # (B, T, stack, 1 + deltas, M)
    return per[:, :, :, 0].reshape(batch, time, stack * n_mels)


class FutureL1(NamedTuple):
    """:func:`future_l1` over the batch, and per utterance for the per-language losses."""

    loss_sum: Tensor
    """() float32: ``|predictions[t] - frames[t + shift]|`` summed over the counted frames."""
    baseline_sum: Tensor
    """() float32: the same sum for the prediction ``frames[t]``."""
    num_frames: Tensor
    """() long: frames counted."""
    row_loss_sum: Tensor
    """(B,) float32, detached: each utterance's part of ``loss_sum``."""
    row_frames: Tensor
    """(B,) long: each utterance's frames counted."""


def future_l1(predictions: Tensor, frames: Tensor, lengths: Tensor, *, shift: int) -> FutureL1:
    """APC's loss over t + shift < ``lengths`` (B,) (:class:`FutureL1`).

    ``predictions`` and ``frames`` are (B, T, M); every channel of a counted frame counts.
    """
    time = frames.shape[1]
    n = min(shift, time)
    ahead = frames[:, n:]  # (B, T-n, M): frame t + n
    valid = ((torch.arange(time - n, device=frames.device) + n).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)
    err = (predictions[:, : time - n] - ahead).abs()  # (B, T-n, M)
    counted = torch.where(valid, err, torch.zeros_like(err))
    loss_sum = counted.sum()
    with torch.no_grad():
        copy = (frames[:, : time - n] - ahead).abs()
        baseline = torch.where(valid, copy, torch.zeros_like(copy)).sum()
        row_loss = counted.sum(dim=(1, 2))  # (B,)
    row_frames = valid.long().sum(dim=(1, 2))  # (B,)
    return FutureL1(loss_sum=loss_sum, baseline_sum=baseline, num_frames=row_frames.sum(), row_loss_sum=row_loss,
                    row_frames=row_frames)


class ReconstructionOutput(NamedTuple):
    """What a reconstruction step logs or differentiates; all tensors, no host values."""

    loss_sum: Tensor
    """() float32: absolute error summed over the reconstructed values."""
    num_values: Tensor
    """() long: reconstructed values (the loss's count)."""
    baseline_sum: Tensor
    """() float32: the same sum for the trivial predictor (APC: frame t; TERA: each channel's utterance mean)."""
    num_frames: Tensor
    """() long: frames with at least one reconstructed value."""
    predictions: Tensor
    """(B, T, M): the model's frames (APC: of t + shift at t)."""
    targets: Tensor
    """(B, T, M): the clean static log-mel frames."""
    last_hidden_state: Tensor
    """(B, T, D): the context network's output."""
    padding_mask: Tensor | None
    """(B, T) bool frame padding (True = padded), None without padding."""
    row_loss_sum: Tensor
    """(B,) float32, detached: each utterance's part of ``loss_sum``, for the per-language losses."""
    row_values: Tensor
    """(B,) long: each utterance's reconstructed values (its part of ``num_values``)."""


class ApcModel(nn.Module):
    """Autoregressive predictive coding: encoder (causal) + Linear postnet to frame t + ``shift``."""

    def __init__(self, encoder: Wav2Vec2Encoder, *, n_mels: int, deltas: int, stack: int, shift: int):
        super().__init__()
        if shift < 1:
            raise ValueError(f"shift: expected >= 1 frame, got {shift}")
        self.encoder = encoder
        self.layout = {"n_mels": n_mels, "deltas": deltas, "stack": stack}
        self.target_dim = n_mels * stack
        self.postnet = nn.Linear(encoder.dim, self.target_dim)
        self.shift = shift

    def set_num_updates(self, step: int) -> None:
        """No schedule inside the model."""

    def num_values(self, lengths: Tensor) -> Tensor:
        """() long: values the loss counts for utterances of ``lengths`` (B,) frames."""
        return torch.clamp(lengths.long() - self.shift, min=0).sum() * self.target_dim

    def forward(self, source: Tensor, padding_mask: Tensor | None = None, *,
                layerdrop_generator: torch.Generator | None = None) -> ReconstructionOutput:
        enc = self.encoder
        features, frame_pad, lengths = enc.extract_features(source, padding_mask)  # (B, T, C)
        x, _ = enc.feature_projection(features)
        hidden = enc.transformer(x, frame_pad, layerdrop_generator=layerdrop_generator)  # (B, T, D)
        pred = self.postnet(hidden).float()  # (B, T, M)
        target = static_channels(features.detach(), **self.layout).float()  # (B, T, M)
        l1 = future_l1(pred, target, lengths, shift=self.shift)
        return ReconstructionOutput(
            loss_sum=l1.loss_sum, num_values=l1.num_frames * self.target_dim, baseline_sum=l1.baseline_sum,
            num_frames=l1.num_frames, predictions=pred, targets=target, last_hidden_state=hidden,
            padding_mask=frame_pad, row_loss_sum=l1.row_loss_sum, row_values=l1.row_frames * self.target_dim,
        )


class Alterations(NamedTuple):
    """Mockingjay/TERA's random alterations of a batch, drawn before the forward."""

    time: Tensor
    """(B, T) bool: frames in a time span (never padding)."""
    treatment: Tensor
    """(B,) long: what the spans get: 0 zeroed, 1 replaced by other frames, 2 kept."""
    shift: Tensor
    """(B,) long: a replaced frame t reads frame (t + shift) mod length (1 .. length - 1)."""
    band_start: Tensor
    """(B,) long: first log-mel channel of the zeroed band."""
    band_width: Tensor
    """(B,) long: channels in the band (0: none)."""
    noisy: Tensor
    """(B,) bool: utterances that get Gaussian noise on every frame."""


class MaskedReconstructionModel(nn.Module):
    """Mockingjay/TERA: encoder + prediction head (Linear, GELU, LayerNorm, Linear) reconstructing
    the static log-mel channels at the altered positions (module doc)."""

    def __init__(
        self,
        encoder: Wav2Vec2Encoder,
        *,
        n_mels: int,
        deltas: int,
        stack: int,
        mask_prob: float,
        mask_length: int,
        min_masks: int,
        zero_prob: float,
        replace_prob: float,
        freq_width: float,
        noise_prob: float,
        noise_std: float,
    ):
        super().__init__()
        self.encoder = encoder
        self.layout = {"n_mels": n_mels, "deltas": deltas, "stack": stack}
        self.target_dim = n_mels * stack
        dim = encoder.dim
        # s3prl's TransformerSpecPredictionHead (not named ``head``: that marks a CTC model)
        self.reconstruction_head = nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=1e-12), nn.Linear(dim, self.target_dim)
        )
        self.mask_prob, self.mask_length, self.min_masks = mask_prob, mask_length, min_masks
        self.zero_prob, self.replace_prob = zero_prob, replace_prob
        self.max_band = int(n_mels * freq_width)
        self.noise_prob, self.noise_std = noise_prob, noise_std

    def set_num_updates(self, step: int) -> None:
        """No schedule inside the model."""

    def sample_alterations(self, batch: int, num_frames: int, lengths: Tensor,
                           generator: torch.Generator | None = None) -> Alterations:
        """The random choices of a batch (:class:`Alterations`), on ``lengths.device``."""
        device = lengths.device
        lengths = lengths.long()
        time = compute_span_mask((batch, num_frames), mask_prob=self.mask_prob, mask_length=self.mask_length,
                                 min_masks=self.min_masks, lengths=lengths, generator=generator, device=device)
        u = _rand((batch, 5), generator, device)  # per utterance: treatment, shift, width, start, noise
        treatment = torch.where(u[:, 0] < self.zero_prob, 0, torch.where(u[:, 0] < self.zero_prob + self.replace_prob,
                                                                        1, 2))
        shift = 1 + torch.floor(u[:, 1] * (lengths - 1).clamp(min=0)).long()
        shift = torch.minimum(shift, (lengths - 1).clamp(min=0))  # 0 for a one-frame utterance: itself
        width = torch.floor(u[:, 2] * (self.max_band + 1)).long().clamp(max=self.max_band)  # 0 .. max_band
        n_mels = self.layout["n_mels"]
        start = torch.floor(u[:, 3] * (n_mels - width)).long().clamp(min=0)  # 0 .. n_mels - width - 1
        start = torch.minimum(start, (n_mels - width - 1).clamp(min=0))
        noisy = u[:, 4] < self.noise_prob
        return Alterations(time=time, treatment=treatment, shift=shift, band_start=start, band_width=width,
                           noisy=noisy)

    def num_values(self, alt: Alterations, lengths: Tensor) -> Tensor:
        """() long: values the loss counts: every channel of span frames, the band's channels of the others."""
        spans = alt.time.long().sum(dim=1)  # (B,)
        others = lengths.long() - spans
        return (spans * self.target_dim + others * alt.band_width * self.layout["stack"]).sum()

    def _band(self, alt: Alterations, per_frame: int) -> Tensor:
        """(B, per_frame * n_mels) bool: the band's channels in every (stack, delta) copy of a frame."""
        ch = torch.arange(self.layout["n_mels"], device=alt.band_start.device)
        band = (ch >= alt.band_start.unsqueeze(1)) & (ch < (alt.band_start + alt.band_width).unsqueeze(1))  # (B, M)
        return band.repeat(1, per_frame)

    def positions(self, alt: Alterations, valid: Tensor) -> Tensor:
        """(B, T, M) bool: the target values the loss counts (span frames, the band's channels),
        on the (B, T) ``valid`` frames."""
        band = self._band(alt, self.layout["stack"]).unsqueeze(1)  # (B, 1, M)
        return (alt.time.unsqueeze(-1) | band) & valid.unsqueeze(-1)

    def alter(self, features: Tensor, alt: Alterations, lengths: Tensor, generator: torch.Generator | None) -> Tensor:
        """The altered input of (B, T, C) frames."""
        batch, time, channels = features.shape
        t = torch.arange(time, device=features.device)
        source = (t.unsqueeze(0) + alt.shift.unsqueeze(1)) % lengths.long().clamp(min=1).unsqueeze(1)  # (B, T)
        replaced = features.gather(1, source.unsqueeze(-1).expand(-1, -1, channels))
        span = alt.time.unsqueeze(-1)  # (B, T, 1)
        x = torch.where(span & (alt.treatment == 1).view(batch, 1, 1), replaced, features)
        x = torch.where(span & (alt.treatment == 0).view(batch, 1, 1), torch.zeros_like(x), x)
        per_frame = channels // self.layout["n_mels"]
        x = torch.where(self._band(alt, per_frame).unsqueeze(1), torch.zeros_like(x), x)
        if self.noise_prob > 0:
            gen_device = generator.device if generator is not None else features.device
            noise = torch.randn(features.shape, generator=generator, device=gen_device).to(features.device)
            x = torch.where(alt.noisy.view(batch, 1, 1), x + self.noise_std * noise.to(x.dtype), x)
        return x

    def forward(
        self,
        source: Tensor,
        padding_mask: Tensor | None = None,
        *,
        alterations: Alterations | None = None,
        generator: torch.Generator | None = None,
        layerdrop_generator: torch.Generator | None = None,
    ) -> ReconstructionOutput:
        """One pass over ``source`` (B, S); alterations from ``generator`` unless given."""
        enc = self.encoder
        features, frame_pad, lengths = enc.extract_features(source, padding_mask)  # (B, T, C)
        batch, time, _ = features.shape
        if alterations is None:
            alterations = self.sample_alterations(batch, time, lengths, generator)
        else:
            check_shape("alterations.time", alterations.time, (batch, time))
        valid = ~frame_padding_mask(time, lengths)  # (B, T)
        alt = alterations._replace(time=alterations.time.to(features.device) & valid)
        x, _ = enc.feature_projection(self.alter(features, alt, lengths, generator))
        hidden = enc.transformer(x, frame_pad, layerdrop_generator=layerdrop_generator)  # (B, T, D)
        pred = self.reconstruction_head(hidden).float()  # (B, T, M)
        target = static_channels(features.detach(), **self.layout).float()  # (B, T, M)
        where = self.positions(alt, valid)  # (B, T, M)
        err = (pred - target).abs()
        counted = torch.where(where, err, torch.zeros_like(err))  # (B, T, M)
        loss_sum = counted.sum()
        with torch.no_grad():
            count = valid.sum(dim=1).clamp(min=1).view(batch, 1, 1)
            mean = (target * valid.unsqueeze(-1)).sum(dim=1, keepdim=True) / count  # (B, 1, M): per channel
            baseline = torch.where(where, (target - mean).abs(), torch.zeros_like(target)).sum()
            num_frames = where.any(dim=-1).long().sum()
            row_loss = counted.sum(dim=(1, 2))  # (B,)
        row_values = where.long().sum(dim=(1, 2))  # (B,)
        return ReconstructionOutput(
            loss_sum=loss_sum, num_values=row_values.sum(), baseline_sum=baseline, num_frames=num_frames,
            predictions=pred, targets=target, last_hidden_state=hidden, padding_mask=frame_pad,
            row_loss_sum=row_loss, row_values=row_values,
        )
