"""BEST-RQ's targets: a frozen random-projection quantizer over log-mel frames.

For each of ``codebooks`` codebooks: the frame's features (normalised log-mel frames
stacked to the model's frame rate) times a random matrix (Xavier-uniform, ``in_dim`` x
``codebook_dim``), L2-normalised, and the id of the nearest of ``codebook_size`` random
L2-normalised N(0, 1) codewords (SpeechBrain's recipe, FAMILY.md section 7). Nothing here
is trained: the projection and the codebooks are buffers drawn from a generator seeded by
``seed`` (the same on every rank and every run of a config) and saved with the model, so
a checkpoint holds the exact targets it was trained on, and no optimizer, weight decay
or ZeRO partitioning ever touches them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RandomProjectionQuantizer(nn.Module):
    """(B, T, in_dim) features -> (B, T, codebooks) target ids; frozen (module doc)."""

    def __init__(self, in_dim: int, *, codebooks: int, codebook_size: int, codebook_dim: int, seed: int) -> None:
        super().__init__()
        if min(in_dim, codebooks, codebook_size, codebook_dim) < 1:
            raise ValueError(
                f"RandomProjectionQuantizer: expected positive sizes, got in_dim={in_dim}, codebooks={codebooks}, "
                f"codebook_size={codebook_size}, codebook_dim={codebook_dim}"
            )
        gen = torch.Generator().manual_seed(seed)
        bound = math.sqrt(6.0 / (in_dim + codebook_dim))  # Xavier-uniform
        projection = (torch.rand(codebooks, in_dim, codebook_dim, generator=gen) * 2 - 1) * bound
        book = F.normalize(torch.randn(codebooks, codebook_size, codebook_dim, generator=gen), dim=-1)
        self.register_buffer("projection", projection)  # (G, C, d)
        self.register_buffer("codebook", book)  # (G, V, d)

    @property
    def codebooks(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def codebook_size(self) -> int:
        return int(self.codebook.shape[1])

    @torch.no_grad()
    def forward(self, features: Tensor) -> Tensor:
        x = torch.einsum("btc,gcd->btgd", features.float(), self.projection.float())  # (B, T, G, d)
        x = F.normalize(x, dim=-1)
        # Nearest codeword of unit vectors: the largest cosine.
        sim = torch.einsum("btgd,gvd->btgv", x, self.codebook.float())  # (B, T, G, V)
        return sim.argmax(dim=-1)  # (B, T, G)
