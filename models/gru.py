"""APC's context network: unidirectional GRU layers (FAMILY.md section 10; s3prl's ``APC``).

Layer i is a one-layer ``nn.GRU`` of ``dim`` units; dropout follows every layer but the
last, and from the second layer on the layer's input is added to its output (s3prl's
``residual``: the first layer widens the input, 80 log-mel channels to 512). A
unidirectional GRU's output at frame t depends on frames up to t only, so right padding
changes nothing before it: the batch needs no packing, and an utterance's states are the
same whatever it is batched with.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class GRULayer(nn.Module):
    """GRU -> dropout (all layers but the last) -> + input (all layers but the first). (B, T, C) -> (B, T, D)."""

    def __init__(self, in_dim: int, dim: int, *, dropout: float, residual: bool):
        super().__init__()
        self.gru = nn.GRU(in_dim, dim, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.gru(x)  # (B, T, D)
        y = self.dropout(y)
        return y + x if self.residual else y


class GRUContext(nn.Module):
    """``num_layers`` unidirectional GRU layers; the interface of the other context networks
    (``forward(x, padding_mask, layerdrop_generator=)``, ``layers``, ``out_dim``, activation
    checkpointing), no LayerDrop."""

    def __init__(self, *, in_dim: int, dim: int, num_layers: int, dropout: float):
        super().__init__()
        self.out_dim = dim
        self.layer_norm_first = False
        """No final LayerNorm: the last layer's output is the last hidden state."""
        self.checkpoint_activations = False
        """Recompute each layer in the backward (``train.activation_checkpointing``)."""
        self.layers = nn.ModuleList(
            GRULayer(in_dim if i == 0 else dim, dim, dropout=dropout if i + 1 < num_layers else 0.0, residual=i > 0)
            for i in range(num_layers)
        )

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, *,
                layerdrop_generator: torch.Generator | None = None) -> Tensor:
        """``padding_mask`` (B, T) True at padded frames: unused (see the module doc)."""
        recompute = self.checkpoint_activations and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        return x
