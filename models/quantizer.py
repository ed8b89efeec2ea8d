"""Gumbel product quantizer: G codebooks of V codewords; one codeword per group per frame.

Training uses ``gumbel_softmax(hard=True)``: the forward pass picks one codeword per
group (argmax of logits + Gumbel noise, divided by the temperature), the backward pass
uses the soft probabilities (straight-through). Evaluation picks the argmax of the logits
without noise, as fairseq and Hugging Face do.

The temperature lives in a buffer so that it is saved and restored with the model;
``set_num_updates(step)`` sets it to ``max(start * decay**step, end)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


def gumbel_softmax_hard(
    logits: Tensor, tau: Tensor | float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One-hot of ``argmax(logits + g)`` forward, gradient of ``softmax((logits + g) / tau)``.

    ``g`` is standard Gumbel noise, ``-log(Exp(1))``, drawn from ``generator`` (on its
    device) so that the draw is reproducible per rank and step. Returns the
    straight-through one-hot (..., V) and the chosen index (...,).
    """
    gen_device = generator.device if generator is not None else logits.device
    exp = torch.empty(logits.shape, dtype=logits.dtype, device=gen_device).exponential_(generator=generator)
    if exp.device != logits.device:
        exp = exp.to(logits.device, non_blocking=True)
    soft = ((logits - exp.log()) / tau).softmax(dim=-1)
    index = soft.argmax(dim=-1, keepdim=True)
    hard = torch.zeros_like(soft).scatter_(-1, index, 1.0)
    return hard - soft.detach() + soft, index.squeeze(-1)


def perplexity(probs: Tensor) -> Tensor:
    """exp(entropy) of each row of ``probs`` (..., V), with 0 log 0 = 0."""
    return torch.exp(-torch.xlogy(probs, probs).sum(dim=-1))


class QuantizerOutput(NamedTuple):
    """What the quantizer returns for a (B, T, C) input."""

    vectors: Tensor
    """(B, T, codevector_dim): the concatenated chosen codewords."""
    codes: Tensor
    """(B, T, G) long: the codeword chosen per group (with the Gumbel noise in training);
    two frames with equal codes have identical targets."""
    code_perplexity: Tensor
    """(G,): perplexity of the hard choices (argmax of the logits, no noise)."""
    prob_perplexity: Tensor
    """(G,): perplexity of the averaged softmax; drives the diversity loss."""
    temperature: Tensor
    """(): the Gumbel temperature used."""
    argmax_share: Tensor
    """(G,): share of the counted frames whose argmax (no noise) is the group's most frequent
    codeword: near 1, every frame has the same target whatever the noise draws."""


class GumbelVectorQuantizer(nn.Module):
    """Linear(C -> G*V) logits, Gumbel choice per group, codebook (1, G*V, codevector_dim/G).

    vq-wav2vec's variant (FAMILY.md section 9): ``proj_depth`` > 1 computes the logits with
    an MLP (``proj_depth - 1`` blocks of Linear(-> 2C) + ``activation``, then the Linear to
    G*V; PyTorch's default initialisation, as fairseq's), and ``shared_codebook`` gives every
    group the same V codewords (fairseq ``combine_groups``; codebook (1, V, codevector_dim/G)).
    """

    def __init__(
        self,
        in_dim: int,
        *,
        groups: int,
        entries: int,
        codevector_dim: int,
        temperature: tuple[float, float, float],
        proj_depth: int = 1,
        shared_codebook: bool = False,
        activation: nn.Module | None = None,
    ):
        super().__init__()
        if codevector_dim % groups:
            raise ValueError(
                f"model.quantizer.codevector_dim ({codevector_dim}) must be divisible by "
                f"model.quantizer.groups ({groups})"
            )
        self.groups = groups
        self.entries = entries
        self.shared_codebook = shared_codebook
        if proj_depth > 1:
            inner = 2 * in_dim  # fairseq's weight_proj_factor 2 for wav2vec models
            blocks: list[nn.Module] = []
            for i in range(proj_depth - 1):
                blocks += [nn.Linear(in_dim if i == 0 else inner, inner), activation or nn.GELU()]
            self.weight_proj: nn.Module = nn.Sequential(*blocks, nn.Linear(inner, groups * entries))
        else:
            self.weight_proj = nn.Linear(in_dim, groups * entries)
            nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
            nn.init.zeros_(self.weight_proj.bias)
        books = 1 if shared_codebook else groups
        self.codevectors = nn.Parameter(torch.empty(1, books * entries, codevector_dim // groups).uniform_())
        self.start_temp, self.end_temp, self.temp_decay = temperature
        self.register_buffer("temperature", torch.tensor(float(self.start_temp)))

    @property
    def num_codevectors(self) -> int:
        """G * V, the normaliser of the diversity loss."""
        return self.groups * self.entries

    def logits(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, G, V) float32 codeword scores."""
        batch, time, _ = x.shape
        return self.weight_proj(x).float().view(batch, time, self.groups, self.entries)

    @torch.no_grad()
    def codes(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, T, G) ids of (B, T, C): the argmax of the logits, no noise (the eval-mode choice)."""
        return self.logits(x).argmax(dim=-1)

    def set_num_updates(self, step: int) -> None:
        """Temperature for update ``step``: ``max(start * decay**step, end)``."""
        value = max(self.start_temp * self.temp_decay**step, self.end_temp)
        with torch.no_grad():
            self.temperature.fill_(value)

    def forward(self, x: Tensor, mask: Tensor | None = None, *, generator: torch.Generator | None = None) -> QuantizerOutput:
        """Quantize (B, T, C) latents; perplexities count only frames where ``mask`` is True.

        Both references measure perplexity over the masked frames (fairseq quantizes only
        those; Hugging Face passes ``mask_time_indices``); padding is never masked.
        """
        batch, time, _ = x.shape
        logits = self.logits(x)  # (B, T, G, V)
        best = logits.argmax(dim=-1)  # (B, T, G)
        hard = torch.zeros_like(logits).scatter_(-1, best.unsqueeze(-1), 1.0)  # (B, T, G, V) one-hot

        if mask is None:
            weights = torch.ones(batch, time, device=x.device, dtype=logits.dtype)
        else:
            weights = mask.to(logits.dtype)
        count = weights.sum().clamp(min=1.0)
        w = weights.view(batch, time, 1, 1)
        with torch.no_grad():
            code_probs = (hard * w).sum(dim=(0, 1)) / count  # (G, V)
        soft_probs = (logits.softmax(dim=-1) * w).sum(dim=(0, 1)) / count  # (G, V)

        if self.training:
            choice, codes = gumbel_softmax_hard(logits, self.temperature, generator)
        else:
            choice, codes = hard, best
        # (B*T, G, V) @ (G, V, d) per group -> (B, T, G*d)
        book = self.codevectors.view(-1, self.entries, self.codevectors.shape[-1]).expand(self.groups, -1, -1)
        vectors = torch.einsum("btgv,gvd->btgd", choice.to(book.dtype), book).reshape(batch, time, -1)
        return QuantizerOutput(
            vectors=vectors,
            codes=codes,
            code_perplexity=perplexity(code_probs),
            prob_perplexity=perplexity(soft_probs),
            temperature=self.temperature.detach().clone(),
            argmax_share=code_probs.max(dim=-1).values,
        )
