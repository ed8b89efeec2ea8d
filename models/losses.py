"""The wav2vec 2.0 objective as sums plus counts (fairseq's form).

The training loop divides by the global count of masked frames across ranks and
accumulation steps, so every function here returns a sum (or a batch statistic that the
model multiplies by its own count) and never a mean over a local batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def contrastive_loss(
    context: Tensor,
    targets: Tensor,
    codes: Tensor,
    mask: Tensor,
    negative_indices: Tensor,
    *,
    logit_temp: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """InfoNCE over masked frames; returns (loss sum, number correct, logits).

    ``context`` and ``targets`` (B, T, F) are the projected context vectors and quantized
    targets, ``codes`` (B, T, G) the codewords behind each target, ``mask`` (B, T) the
    masked frames, ``negative_indices`` (B, T, K) per-utterance distractor frames.
    Candidates are [target, K distractors]; logits are cosine / ``logit_temp``; a
    distractor whose codewords equal the target's gets -inf; cross-entropy with the true
    target at index 0, summed over masked frames.

    Cosines come from one (T x T) similarity matrix per utterance and a gather, instead of
    materialising (B, T, K, F) distractor vectors: memory grows with T^2 rather than
    T * K * F, which is far smaller at K = 100.

    Identity is judged on the codewords, not on float equality of the vectors: in
    training the straight-through estimator leaves identical choices different in the
    last bit, so the float test of the references almost never fires there.
    """
    batch, time, num_neg = negative_indices.shape
    c = F.normalize(context.float(), dim=-1, eps=1e-8)  # (B, T, F)
    q = F.normalize(targets.float(), dim=-1, eps=1e-8)  # (B, T, F)
    positive = (c * q).sum(dim=-1, keepdim=True)  # (B, T, 1)
    sim = torch.bmm(c, q.transpose(1, 2))  # (B, T, T): cos(c_t, q_s)
    negative = sim.gather(2, negative_indices)  # (B, T, K)

    flat_idx = negative_indices.reshape(batch, time * num_neg)
    same = torch.ones_like(negative_indices, dtype=torch.bool)
    for g in range(codes.shape[-1]):
        neg_codes = codes[..., g].gather(1, flat_idx).view(batch, time, num_neg)
        same &= neg_codes == codes[..., g].unsqueeze(-1)
    negative = negative.masked_fill(same, float("-inf"))

    logits = torch.cat([positive, negative], dim=-1) / logit_temp  # (B, T, K + 1)
    per_frame = torch.logsumexp(logits, dim=-1) - logits[..., 0]  # (B, T)
    mask = mask.bool()
    loss_sum = torch.where(mask, per_frame, torch.zeros_like(per_frame)).sum()
    with torch.no_grad():
        # fairseq's accuracy: the target is the argmax, and not merely because all are equal.
        is_max = logits.argmax(dim=-1) == 0
        is_min = logits.argmin(dim=-1) == 0
        num_correct = (is_max & ~is_min & mask).sum()
    return loss_sum, num_correct, logits


def masked_cross_entropy(logits: Tensor, target_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of ``G`` codebooks' ids at masked frames; returns (sum, number correct).

    ``logits`` (B, T, G, V) score every frame's ids, ``target_ids`` (B, T, G) are the right
    ones, ``mask`` (B, T) the frames that count. Each frame contributes its cross-entropy
    (and its right guesses) averaged over the codebooks, so the sum is over masked frames
    like every other loss here and its chance level is ln(V) per frame. Every frame is
    scored and the mask then weights them: boolean indexing would size a tensor by a
    device value (a host sync).
    """
    batch, time, groups, size = logits.shape
    ce = F.cross_entropy(logits.float().reshape(-1, size), target_ids.reshape(-1), reduction="none")
    ce = ce.view(batch, time, groups).mean(dim=-1)  # (B, T)
    weights = mask.to(ce.dtype)
    with torch.no_grad():
        right = (logits.argmax(dim=-1) == target_ids).to(ce.dtype).mean(dim=-1)  # (B, T)
        num_correct = (right * weights).sum()
    return (ce * weights).sum(), num_correct


def diversity_loss(prob_perplexity: Tensor, num_codevectors: int) -> Tensor:
    """``(G*V - sum_g exp(H_g)) / (G*V)``: 0 when every codeword is used equally."""
    return (num_codevectors - prob_perplexity.sum()) / num_codevectors


def feature_penalty(features: Tensor, padding_mask: Tensor | None) -> Tensor:
    """Mean of squares of the encoder features (B, T, C) over unpadded frames.

    fairseq averages over every frame, padding included; padded frames are excluded here
    (the two agree on unpadded batches, the usual cropped case).
    """
    sq = features.float().pow(2)  # (B, T, C)
    if padding_mask is None:
        return sq.mean()
    valid = (~padding_mask).unsqueeze(-1).to(sq.dtype)  # (B, T, 1)
    return (sq * valid).sum() / (valid.sum() * features.shape[-1]).clamp(min=1.0)
