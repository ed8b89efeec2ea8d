"""Span masking, distractor sampling and padding masks, vectorised in torch.

Everything here runs on the tensors' device from an explicit ``torch.Generator`` so that
a training loop can make masks reproducible per (seed, step, rank) and never wait on the
host: no numpy, no per-utterance Python loops, no ``.item()``.

Semantics follow fairseq's ``compute_mask_indices`` (static span lengths, overlap
allowed): each utterance of ``n`` valid frames gets ``max(min_masks, int(prob * n / length
+ u))`` span starts, ``u ~ U[0, 1)`` per utterance (probabilistic rounding), drawn without
replacement from its first ``n - length`` frames; each start masks ``length`` frames;
spans may overlap; padding is never masked. fairseq additionally trims every row to the
batch's smallest mask count (``require_same_masks``) because it gathers masked frames
with a reshape; the losses here work on boolean masks, so each row keeps its own count.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) draws from ``generator`` (on its device), moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=gen_device)
    return u if u.device == device else u.to(device, non_blocking=True)


def frame_padding_mask(num_frames: int, lengths: Tensor) -> Tensor:
    """(B, T) bool, True at frames at or beyond each utterance's length (right padding)."""
    t = torch.arange(num_frames, device=lengths.device)
    return t.unsqueeze(0) >= lengths.unsqueeze(1)  # (B, T)


def compute_span_mask(
    shape: tuple[int, int],
    *,
    mask_prob: float,
    mask_length: int,
    min_masks: int = 0,
    lengths: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(B, T) bool mask of spans, fairseq ``compute_mask_indices`` semantics (module docstring).

    ``lengths`` (B,) holds each row's valid length (frames beyond it are padding and are
    never masked); ``None`` means every row is ``T`` long. With ``mask_prob`` 0.65,
    ``mask_length`` 10 and 500 frames about 49% of the frames end up masked.
    """
    batch, total = shape
    if device is None:
        device = lengths.device if lengths is not None else torch.device("cpu")
    device = torch.device(device)
    if mask_length < 1:
        raise ValueError(f"mask_length: expected >= 1, got {mask_length}")
    if lengths is None:
        lengths = torch.full((batch,), total, dtype=torch.long, device=device)
    lengths = lengths.to(device=device, dtype=torch.long).clamp(0, total)
    if mask_prob <= 0 or total == 0:
        return torch.zeros(batch, total, dtype=torch.bool, device=device)

    # Number of spans per row, probabilistically rounded.
    u = _rand((batch,), generator, device)
    num_spans = torch.floor(mask_prob * lengths.double() / mask_length + u.double()).long()
    num_spans = num_spans.clamp(min=min_masks)  # (B,)
    # Candidate starts: the first ``n - length`` frames; fairseq widens the range to
    # ``num_spans + 1`` starts when the row is too short for that many.
    candidates = lengths - mask_length
    candidates = torch.where(candidates <= num_spans, num_spans + 1, candidates)
    candidates = torch.minimum(candidates, lengths)
    num_spans = torch.minimum(num_spans, candidates)  # (B,)

    # Sampling without replacement: rank random keys; invalid starts rank last.
    t = torch.arange(total, device=device)
    keys = _rand((batch, total), generator, device)
    keys = torch.where(t.unsqueeze(0) < candidates.unsqueeze(1), keys, torch.full_like(keys, 2.0))
    order = keys.argsort(dim=1)  # (B, T)
    rank = torch.empty_like(order).scatter_(1, order, t.unsqueeze(0).expand(batch, total))
    starts = rank < num_spans.unsqueeze(1)  # (B, T)

    # Dilate each start over ``mask_length`` frames: a frame is masked if a start lies in
    # (t - length, t]; a cumulative count answers that for every frame at once.
    count = starts.long().cumsum(dim=1)  # (B, T)
    shifted = torch.nn.functional.pad(count, (mask_length, 0))[:, :total]  # count at t - length
    mask = (count - shifted) > 0
    return mask & (t.unsqueeze(0) < lengths.unsqueeze(1))


def sample_negatives(
    mask: Tensor,
    num_negatives: int,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, T, K) long: K distractor frame indices per frame, within the same utterance.

    For a masked frame the distractors are drawn uniformly, with replacement, from the
    *other* masked frames of its utterance (never the frame itself; fairseq's
    ``sample_negatives``). Unmasked frames get their own index (ignored by the loss). An
    utterance with a single masked frame has no distractor: its index points at itself
    and the loss gives that candidate -inf, as for any distractor equal to the target.

    Indices are per utterance (0..T-1), not flattened over the batch as in Hugging Face's
    ``sampled_negative_indices`` (those carry a ``b * T`` offset).
    """
    if mask.dim() != 2:
        raise ValueError(f"mask: expected (B, T), got shape {tuple(mask.shape)}")
    batch, total = mask.shape
    device = mask.device
    mask = mask.bool()
    num = mask.long().sum(dim=1)  # (B,)
    rank = mask.long().cumsum(dim=1) - 1  # (B, T): position among the masked frames
    # Masked frame positions first, in time order (stable sort on "is unmasked").
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # (B, T)

    others = (num - 1).clamp(min=1)  # (B,) number of other masked frames
    u = _rand((batch, total, num_negatives), generator, device)
    j = torch.floor(u * others.view(batch, 1, 1).to(u.dtype)).long()  # (B, T, K) in [0, others)
    j = torch.minimum(j, (others - 1).view(batch, 1, 1))  # guard against u * n rounding up to n
    j = j + (j >= rank.unsqueeze(-1)).long()  # skip the frame itself
    j = torch.minimum(j, (num - 1).clamp(min=0).view(batch, 1, 1))
    neg = order.gather(1, j.view(batch, -1)).view(batch, total, num_negatives)
    own = torch.arange(total, device=device).view(1, total, 1).expand_as(neg)
    single = (num <= 1).view(batch, 1, 1)
    return torch.where(mask.unsqueeze(-1) & ~single, neg, own)


def compute_channel_mask(
    batch: int,
    channels: int,
    *,
    mask_prob: float,
    mask_length: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(B, C) bool: channel spans to zero for every frame (fine-tuning regulariser).

    fairseq draws channel masks with the same span algorithm and ``min_masks`` 0.
    """
    return compute_span_mask(
        (batch, channels), mask_prob=mask_prob, mask_length=mask_length, min_masks=0,
        generator=generator, device=device,
    )


def compute_exact_span_mask(
    shape: tuple[int, int],
    *,
    mask_prob: float,
    mask_length: int,
    adjust: float = 0.0,
    lengths: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(B, T) bool: exactly ``floor(mask_prob * n)`` of each row's ``n`` valid frames masked,
    in spans (data2vec 2.0's ``compute_block_mask_1d`` with ``require_same_masks``).

    Per row: ``int(n * (mask_prob + adjust) / mask_length)`` span centres drawn uniformly
    with replacement from the valid frames, each masking ``mask_length`` frames around it
    (``mask_length // 2`` before), cut at the row's ends; then masked frames chosen
    uniformly are unmasked, or unmasked ones masked, until exactly ``floor(mask_prob * n)``
    are. Rows of equal length therefore keep equally many frames, which is what lets
    data2vec 2.0 drop the masked frames from the student's input. Padding is never masked.
    """
    batch, total = shape
    if device is None:
        device = lengths.device if lengths is not None else torch.device("cpu")
    device = torch.device(device)
    if mask_length < 1:
        raise ValueError(f"mask_length: expected >= 1, got {mask_length}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob: expected in [0, 1], got {mask_prob}")
    if lengths is None:
        lengths = torch.full((batch,), total, dtype=torch.long, device=device)
    lengths = lengths.to(device=device, dtype=torch.long).clamp(0, total)
    t = torch.arange(total, device=device)
    valid = t.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)

    # Span centres, uniform over each row's valid frames, with replacement.
    num_centres = torch.floor(lengths.double() * (mask_prob + adjust) / mask_length).long()  # (B,)
    most = max(1, int(total * (mask_prob + adjust) / mask_length))
    centres = torch.floor(_rand((batch, most), generator, device) * lengths.unsqueeze(1)).long()  # (B, C)
    centres = torch.minimum(centres, (lengths - 1).clamp(min=0).unsqueeze(1))  # u * n rounding up to n
    used = (torch.arange(most, device=device).unsqueeze(0) < num_centres.unsqueeze(1)).long()  # (B, C)
    # Each centre covers [c - length // 2, c - length // 2 + length) cut to [0, n): +1 at its
    # first frame and -1 after its last in a difference array, whose running sum counts the
    # spans over every frame.
    first = (centres - mask_length // 2).clamp(min=0)
    end = torch.minimum(centres - mask_length // 2 + mask_length, lengths.unsqueeze(1))
    diff = torch.zeros(batch, total + 1, dtype=torch.long, device=device)
    diff.scatter_add_(1, first, used).scatter_add_(1, end, -used)
    spans = diff[:, :total].cumsum(dim=1) > 0  # (B, T)

    # Exactly k per row: the k highest of (2 if in a span else 0) + U[0, 1) over valid frames
    # are every span frame in random order, then the other frames in random order.
    k = torch.floor(lengths.double() * mask_prob).long()  # (B,)
    score = spans.double() * 2.0 + _rand((batch, total), generator, device).double()
    score = torch.where(valid, score, torch.full_like(score, -1.0))
    order = score.argsort(dim=1, descending=True)  # (B, T)
    rank = torch.empty_like(order).scatter_(1, order, t.unsqueeze(0).expand(batch, total))
    return (rank < k.unsqueeze(1)) & valid
