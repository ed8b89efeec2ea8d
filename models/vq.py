"""vq-wav2vec's quantizers of the front end's features (FAMILY.md section 9; fairseq's
``KmeansVectorQuantizer`` and ``GumbelVectorQuantizer``) and the projection that puts one
in the encoder.

- Gumbel: :class:`models.quantizer.GumbelVectorQuantizer` with an MLP for the logits and
  one codebook shared by the groups.
- k-means (:class:`KmeansVectorQuantizer`): a grouped 1x1 convolution and a GroupNorm (one
  group per codebook group, statistics over valid frames) give ``z_e``; each group's slice
  is replaced by its nearest codeword (Euclidean) ``z_q``; the forward value is ``z_q``,
  the gradient goes to ``z_e`` as if it had been the identity (straight-through); the loss
  ``mse(z_q, sg(z_e)) + gamma * mse(z_e, sg(z_q))`` moves the codewords to the features and
  keeps the features near their codewords.

:class:`QuantizedProjection` holds the quantizer in the encoder's projection slot, so the
context network reads quantized frames in pretraining, probing and fine-tuning alike, and a
checkpoint's encoder carries its codebook. The ids of every frame (``codes``) are
vq-wav2vec's tokens: what its second stage (a BERT on the tokens) is trained on.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from models.causal_conv import ValidGroupNorm
from models.quantizer import GumbelVectorQuantizer, perplexity


class KmeansOutput(NamedTuple):
    """What the k-means quantizer returns for a (B, T, C) input."""

    vectors: Tensor
    """(B, T, C): the chosen codewords forward, the straight-through gradient to ``z_e`` backward."""
    codes: Tensor
    """(B, T, G) long: the nearest codeword of each group."""
    code_perplexity: Tensor
    """(G,): perplexity of the choices over the counted frames."""
    loss: Tensor
    """(): ``mse(z_q, sg(z_e)) + gamma * mse(z_e, sg(z_q))`` over the counted frames."""
    argmax_share: Tensor
    """(G,): share of the counted frames on each group's most frequent codeword."""


class KmeansVectorQuantizer(nn.Module):
    """(B, T, C) -> nearest of ``entries`` codewords per group of C / ``groups`` channels (module doc)."""

    def __init__(self, dim: int, *, groups: int, entries: int, shared_codebook: bool, gamma: float,
                 codebook_std: float = 0.01):
        super().__init__()
        if dim % groups:
            raise ValueError(f"KmeansVectorQuantizer: {groups} groups must divide the {dim} feature channels")
        self.groups = groups
        self.entries = entries
        self.gamma = gamma
        self.projection = nn.Conv1d(dim, dim, kernel_size=1, groups=groups, bias=False)
        self.norm = ValidGroupNorm(groups, dim)
        # (V, 1 or G, C / G); fairseq: 0.01 * N(0, 1)
        self.codebook = nn.Parameter(codebook_std * torch.randn(entries, 1 if shared_codebook else groups, dim // groups))

    def _encode(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """z_e (B, T, C) of (B, T, C) features; ``mask`` (B, T) True at valid frames (right padding)."""
        lengths = None if mask is None else mask.long().sum(dim=1)
        return self.norm(self.projection(x.transpose(1, 2)), lengths).transpose(1, 2)

    def _nearest(self, ze: Tensor) -> tuple[Tensor, Tensor]:
        """(codes (B, T, G), z_q (B, T, C)) of z_e (B, T, C)."""
        batch, time, _ = ze.shape
        book = self.codebook.float().expand(-1, self.groups, -1)  # (V, G, d)
        z = ze.float().view(batch, time, self.groups, -1)  # (B, T, G, d)
        dist = (z.unsqueeze(3) - book.transpose(0, 1)).square().sum(dim=-1)  # (B, T, G, V)
        codes = dist.argmin(dim=-1)  # (B, T, G)
        zq = book.transpose(0, 1)[torch.arange(self.groups, device=ze.device), codes]  # (B, T, G, d)
        return codes, zq.reshape(batch, time, -1)

    @torch.no_grad()
    def codes(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, T, G) ids of (B, T, C) features."""
        return self._nearest(self._encode(x, mask))[0]

    def forward(self, x: Tensor, mask: Tensor | None = None, *, generator: torch.Generator | None = None) -> KmeansOutput:
        """Quantize (B, T, C); the loss and perplexity count the frames where ``mask`` is True."""
        ze = self._encode(x, mask)  # (B, T, C)
        codes, zq = self._nearest(ze)
        weights = torch.ones(ze.shape[:2], device=ze.device) if mask is None else mask.float()  # (B, T)
        count = (weights.sum() * ze.shape[-1]).clamp(min=1.0)
        w = weights.unsqueeze(-1)
        zef = ze.float()
        codebook_term = ((zq - zef.detach()).square() * w).sum() / count  # moves the codewords
        commitment = ((zef - zq.detach()).square() * w).sum() / count  # keeps z_e near them
        with torch.no_grad():
            onehot = nn.functional.one_hot(codes, self.entries).float()  # (B, T, G, V)
            probs = (onehot * w.unsqueeze(-1)).sum(dim=(0, 1)) / weights.sum().clamp(min=1.0)  # (G, V)
        vectors = zq.to(ze.dtype).detach() + (ze - ze.detach())  # value z_q, gradient to z_e
        return KmeansOutput(vectors=vectors, codes=codes, code_perplexity=perplexity(probs),
                            loss=codebook_term + self.gamma * commitment, argmax_share=probs.max(dim=-1).values)


class QuantizedProjection(nn.Module):
    """The encoder's projection slot for vq-wav2vec: quantize the front end's frames, then dropout.

    ``forward(features) -> (dropout(q), q)`` like :class:`models.feature_encoder.FeatureProjection`;
    the pretraining model calls ``quantizer`` itself for the ids, perplexities and losses.
    """

    def __init__(self, quantizer: GumbelVectorQuantizer | KmeansVectorQuantizer, dim: int, dropout: float):
        super().__init__()
        self.quantizer = quantizer
        self.out_dim = dim
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        q = self.quantizer(features).vectors  # (B, T, C)
        return self.dropout(q), q
