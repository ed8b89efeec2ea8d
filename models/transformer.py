"""The context network: convolutional relative positions, then Transformer layers.

Post-LN (BASE, ``layer_norm_first=False``): the LayerNorm follows the positional
embedding and every residual sum. Pre-LN (LARGE, ``layer_norm_first=True``): each
sub-block normalises its input and one LayerNorm closes the stack. Attention goes
through ``scaled_dot_product_attention`` with a key padding mask.

data2vec's variants (FAMILY.md sections 3 and 4) are options of the same stack:
``pos_conv_depth`` > 1 stacks plain convolutions with non-affine LayerNorms as the
positional embedding (data2vec 1.0 and 2.0; Hugging Face's ``Data2VecAudio``), ``alibi``
adds ALiBi's distance penalty to every attention (data2vec 2.0), each layer can return its
feed-forward output before the residual (``return_ffn``: the teacher's targets), and
the stack can drop frames after the positional embedding (``keep``: data2vec 2.0's
student sees only the unmasked frames).

WavLM's gated relative position bias (``relative_bias="gated"``, FAMILY.md section 2):
the stack keeps one learned bias per head and distance bucket (T5's bidirectional log
buckets); every layer adds it to its attention scores after scaling it, per head and
query frame, by a gate computed from the layer's own input (``RelativePositionGate``).
The conv positional embedding stays. Mockingjay and TERA (``absolute_positions``) add
fixed sinusoids in place of the conv positional embedding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def kept_layers(
    num_layers: int, layerdrop: float, *, training: bool, generator: torch.Generator | None
) -> list[bool]:
    """Which of ``num_layers`` layers run this step; LayerDrop only in training.

    The draws come from ``generator`` (a CPU generator: reading the decision must not
    wait on an accelerator). Seeding it from (seed, step) only makes every rank drop
    the same layers, which ZeRO-3 requires. Every context network (Transformer,
    Conformer) draws here, so one seed drops the same layers whatever the layer type.
    """
    if not training or layerdrop <= 0.0:
        return [True] * num_layers
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"layerdrop_generator: expected a CPU torch.Generator, got one on {generator.device}")
    draws = torch.rand(num_layers, generator=generator)
    return (draws >= layerdrop).tolist()


def init_linear_bert_(module: nn.Module) -> None:
    """BERT-style init of every Linear in ``module``: N(0, 0.02) weights, zero biases.

    fairseq applies ``init_bert_params`` to its Transformer and Conformer layers alike.
    """
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, mean=0.0, std=0.02)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


def sinusoid_positions(time: int, dim: int, like: Tensor) -> Tensor:
    """(T, D) fixed absolute positions, ``sin`` on even and ``cos`` on odd channels of
    ``pos / 10000 ** (2 * (i // 2) / D)`` (Mockingjay's table), in ``like``'s dtype and device."""
    pos = torch.arange(time, device=like.device, dtype=torch.float32).unsqueeze(1)  # (T, 1)
    i = torch.arange(dim, device=like.device)
    angles = pos / torch.pow(10000.0, (2 * (i // 2)).float() / dim)  # (T, D)
    return torch.where(i % 2 == 0, angles.sin(), angles.cos()).to(like.dtype)


class PositionalConvEmbedding(nn.Module):
    """Grouped Conv1d over time with weight norm over the kernel dim, then GELU.

    The weight is ``weight_g * weight_v / ||weight_v||``, the norm taken over the output
    and input channels for each kernel tap (``weight_norm(dim=2)``). The two factors are
    parameters of this module itself (not a parametrization submodule) so that ZeRO-3
    gathers them when this module runs. An even kernel yields one frame too many; the
    last is trimmed (fairseq ``SamePad``).
    """

    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        self.kernel = kernel
        self.groups = groups
        std = math.sqrt(4.0 / (kernel * dim))
        v = torch.empty(dim, dim // groups, kernel).normal_(0.0, std)
        self.weight_v = nn.Parameter(v)  # (D, D/G, K)
        self.weight_g = nn.Parameter(v.norm(dim=(0, 1), keepdim=True))  # (1, 1, K)
        self.bias = nn.Parameter(torch.zeros(dim))

    def weight(self) -> Tensor:
        # g * v / ||v||, norm over all dims but 2; torch's fused kernel (what
        # ``nn.utils.weight_norm`` runs) is several times faster than the composed ops.
        return torch._weight_norm(self.weight_v, self.weight_g, 2)  # (D, D/G, K)

    def forward(self, x: Tensor) -> Tensor:
        y = F.conv1d(x.transpose(1, 2), self.weight(), self.bias, padding=self.kernel // 2, groups=self.groups)
        if self.kernel % 2 == 0:
            y = y[:, :, :-1]
        return F.gelu(y).transpose(1, 2)  # (B, T, D)


class ConvBlock(nn.Module):
    """Conv1d ('same' padding, the last frame trimmed for an even kernel) -> non-affine
    LayerNorm over channels -> GELU, on (B, C, T): a layer of data2vec's positional
    embedding and a block of data2vec 2.0's decoder (fairseq's ``make_conv_pos`` stack and
    ``Decoder1d``). torch's default initialisation, as both."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, groups: int):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel, padding=kernel // 2, groups=groups)
        self.trim = kernel % 2 == 0

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)  # (B, C', T + 1 if the kernel is even)
        if self.trim:
            y = y[:, :, :-1]
        y = F.layer_norm(y.transpose(1, 2), y.shape[1:2]).transpose(1, 2)  # over channels
        return F.gelu(y)  # (B, C', T)


class StackedPositionalConv(nn.Module):
    """data2vec's positional embedding: ``depth`` :class:`ConvBlock` of ``kernel`` and
    ``groups``, (B, T, D) -> (B, T, D).

    fairseq's ``pos_conv_depth`` / ``conv_pos`` (width 95 over depth 5: kernel 95 // 5 =
    19 per layer) and Hugging Face's ``Data2VecAudioPositionalConvEmbedding``
    (``num_conv_pos_embeddings`` layers of ``conv_pos_kernel_size``). No weight norm.
    """

    def __init__(self, dim: int, kernel: int, groups: int, depth: int):
        super().__init__()
        self.kernel = kernel
        self.layers = nn.ModuleList(ConvBlock(dim, dim, kernel, groups) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        y = x.transpose(1, 2)  # (B, D, T)
        for layer in self.layers:
            y = layer(y)
        return y.transpose(1, 2)  # (B, T, D)


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's per-head slopes: a geometric series from 2^(-8/n) for n a power of two; other
    head counts take the nearest lower power's and every other one of the next (fairseq's
    ``get_alibi``, data2vec 2.0)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    lower = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(lower) + alibi_slopes(2 * lower)[0::2][: num_heads - lower]


class AlibiBias(nn.Module):
    """The attention bias ``-scale_h * slope_h * |i - j|`` of data2vec 2.0 (ALiBi with a
    learned per-head scale, clamped at 0, shared by every layer; initialised to 1).

    Distances are between the frames' positions in the utterance, so a student that sees
    only its unmasked frames keeps their true distances.
    """

    def __init__(self, num_heads: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_heads))
        self.register_buffer("slopes", torch.tensor(alibi_slopes(num_heads)), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        """(B, K) or (1, K) frame positions -> (B, H, K, K) float32 bias."""
        pos = positions.float()
        distance = (pos.unsqueeze(-1) - pos.unsqueeze(-2)).abs().unsqueeze(1)  # (B, 1, K, K)
        per_head = (self.scale.float().clamp(min=0.0) * self.slopes).view(1, -1, 1, 1)  # (1, H, 1, 1)
        return -per_head * distance


class KeptFrames(NamedTuple):
    """The frames a stack keeps after its positional embedding (data2vec 2.0's student)."""

    indices: Tensor
    """(B, K) long: each kept frame's position in the utterance."""
    padding: Tensor
    """(B, K) bool: True where a row has fewer kept frames than K (filler, never attended to)."""


def relative_position_buckets(time: int, num_buckets: int, max_distance: int, device: torch.device) -> Tensor:
    """(T, T) long: the bucket of each (query i, key j) pair, T5's bidirectional log buckets
    as WavLM's: half the buckets per direction (key after the query: the upper half), the
    first half of those one per distance, the rest log-spaced up to ``max_distance``."""
    half = num_buckets // 2
    exact = half // 2
    rel = torch.arange(time, device=device)[None, :] - torch.arange(time, device=device)[:, None]  # (T, T): j - i
    buckets = (rel > 0).long() * half
    dist = rel.abs()
    far = exact + (torch.log(dist.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    far = torch.clamp(far, max=half - 1)
    return buckets + torch.where(dist < exact, dist, far)


class RelativePositionGate(nn.Module):
    """WavLM's gate of the relative position bias, per head and query frame: the layer's input
    split into heads, ``Linear(head_dim -> 8)``, summed in two groups of 4, sigmoids g_a and
    g_b, then ``g_a * (g_b * a_h - 1) + 2`` with a learned ``a_h`` per head (initially 1)."""

    def __init__(self, head_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.linear = nn.Linear(head_dim, 8)
        self.const = nn.Parameter(torch.ones(1, num_heads, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) attention input -> (B, H, T, 1) gate."""
        batch, time, dim = x.shape
        heads = x.view(batch, time, self.num_heads, dim // self.num_heads).transpose(1, 2)  # (B, H, T, Dh)
        proj = self.linear(heads).view(batch, self.num_heads, time, 2, 4).sum(dim=-1)  # (B, H, T, 2)
        gate_a, gate_b = torch.sigmoid(proj).chunk(2, dim=-1)  # each (B, H, T, 1)
        return gate_a * (gate_b * self.const - 1.0) + 2.0


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection; with ``gated``, WavLM's gate
    of a relative position bias the stack hands every layer."""

    def __init__(self, dim: int, num_heads: int, dropout: float, *, gated: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        if gated:
            self.gate = RelativePositionGate(self.head_dim, num_heads)

    def forward(self, x: Tensor, attn_mask: Tensor | None, position_bias: Tensor | None = None) -> Tensor:
        """``attn_mask`` (B, 1, 1, T) bool, True = attend, or a float bias (B | 1, H, T, T) with
        -inf at padded keys (ALiBi's); ``position_bias`` (1, H, T, T) float (gated layers only)."""
        batch, time, dim = x.shape
        qkv = self.qkv(x).view(batch, time, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
        if position_bias is not None:
            bias = self.gate(x) * position_bias  # (B, H, T, T)
            if attn_mask is not None:
                # a float mask is already a bias with -inf at padded keys (ALiBi's)
                bias = bias + attn_mask if attn_mask.is_floating_point() else bias.masked_fill(~attn_mask, float("-inf"))
            attn_mask = bias
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)  # an additive bias must match the query's dtype (bf16 under autocast)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, Dh)
        return self.out_proj(y.transpose(1, 2).reshape(batch, time, dim))


class FeedForward(nn.Module):
    """Linear -> activation -> dropout (activation_dropout) -> Linear.

    GELU in the Transformer; the Conformer passes SiLU (swish), as fairseq's does.
    """

    def __init__(
        self, dim: int, ffn_dim: int, activation_dropout: float, activation: Callable[[Tensor], Tensor] = F.gelu
    ):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.dropout = nn.Dropout(activation_dropout)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.activation(self.fc1(x))))


class TransformerLayer(nn.Module):
    """One block; ``layer_norm_first`` selects pre-LN, else post-LN."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        *,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        layer_norm_first: bool,
        gated: bool = False,
    ):
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.attention = SelfAttention(dim, num_heads, attention_dropout, gated=gated)
        self.attn_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, activation_dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None, position_bias: Tensor | None = None, *, return_ffn: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """(B, T, D) -> (B, T, D); with ``return_ffn`` also the feed-forward output before
        its dropout and residual (fairseq's ``layer_result``: data2vec's targets)."""
        if self.layer_norm_first:
            x = x + self.dropout(self.attention(self.attn_norm(x), attn_mask, position_bias))
            ffn = self.ffn(self.ffn_norm(x))
            x = x + self.dropout(ffn)
        else:
            x = self.attn_norm(x + self.dropout(self.attention(x, attn_mask, position_bias)))
            ffn = self.ffn(x)
            x = self.ffn_norm(x + self.dropout(ffn))
        return (x, ffn) if return_ffn else x


class TransformerEncoder(nn.Module):
    """Positional conv (or fixed sinusoids) + LayerNorm placement + layers with LayerDrop. (B, T, D) -> (B, T, D)."""

    def __init__(
        self,
        *,
        dim: int,
        ffn_dim: int,
        num_layers: int,
        num_heads: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        layerdrop: float,
        layer_norm_first: bool,
        pos_conv_kernel: int,
        pos_conv_groups: int,
        pos_conv_depth: int = 1,
        alibi: bool = False,
        relative_bias: str = "none",
        relative_buckets: int = 320,
        relative_max_distance: int = 800,
        absolute_positions: bool = False,
    ):
        super().__init__()
        if relative_bias not in ("none", "gated"):
            raise ValueError(f"relative_bias: expected 'none' or 'gated', got {relative_bias!r}")
        gated = relative_bias == "gated"
        self.out_dim = dim
        self.layer_norm_first = layer_norm_first
        self.layerdrop = layerdrop
        self.checkpoint_activations = False
        """Recompute each layer in the backward instead of keeping its activations
        (``train.activation_checkpointing``): memory for compute."""
        self.absolute_positions = absolute_positions
        # Mockingjay/TERA add fixed sinusoids instead: no positional parameters at all.
        self.pos_conv: PositionalConvEmbedding | StackedPositionalConv | None
        if absolute_positions:
            self.pos_conv = None
        elif pos_conv_depth > 1:
            self.pos_conv = StackedPositionalConv(dim, pos_conv_kernel, pos_conv_groups, pos_conv_depth)
        else:
            self.pos_conv = PositionalConvEmbedding(dim, pos_conv_kernel, pos_conv_groups)
        self.alibi = AlibiBias(num_heads) if alibi else None
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(
                dim, ffn_dim, num_heads, dropout=dropout, attention_dropout=attention_dropout,
                activation_dropout=activation_dropout, layer_norm_first=layer_norm_first, gated=gated,
            )
            for _ in range(num_layers)
        )
        init_linear_bert_(self.layers)
        self.relative_buckets = relative_buckets
        self.relative_max_distance = relative_max_distance
        if gated:
            # The stack's one bias table (Hugging Face keeps it in layer 0): it is computed
            # here, so a LayerDrop of the first layer still leaves the others their bias.
            self.relative_embedding = nn.Embedding(relative_buckets, num_heads)

    def position_bias(self, time: int, device: torch.device) -> Tensor | None:
        """(1, H, T, T) the ungated relative position bias; None without one."""
        table = getattr(self, "relative_embedding", None)
        if table is None:
            return None
        buckets = relative_position_buckets(time, self.relative_buckets, self.relative_max_distance, device)
        return table(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, T, T)

    def kept_layers(self, generator: torch.Generator | None) -> list[bool]:
        """Which layers run this step (:func:`kept_layers`)."""
        return kept_layers(len(self.layers), self.layerdrop, training=self.training, generator=generator)

    def _bias_args(self, x: Tensor, keep: KeptFrames | None) -> tuple[Tensor, ...]:
        """The gated relative position bias every layer takes, as extra layer arguments (none
        without one). Its buckets are distances between consecutive frames, which the kept
        frames of data2vec 2.0's student are not: that pairing is refused, not approximated."""
        bias = self.position_bias(x.shape[1], x.device)
        if bias is not None and keep is not None:
            raise ValueError("relative_bias='gated' cannot run on kept frames (keep): its buckets assume every frame")
        return () if bias is None else (bias,)

    def _inputs(
        self, x: Tensor, padding_mask: Tensor | None, keep: KeptFrames | None
    ) -> tuple[Tensor, Tensor | None]:
        """The first layer's input and the attention mask: padded frames zeroed, positions
        added, the kept frames gathered (``keep``), the stack's LayerNorm (post-LN) and dropout.

        The mask is None (nothing to hide, no bias), a (B, 1, 1, T) bool key mask, or with
        ALiBi a (B | 1, H, T, T) float bias with -inf at padded keys.
        """
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + (sinusoid_positions(x.shape[1], x.shape[2], x) if self.pos_conv is None else self.pos_conv(x))
        if keep is not None:
            x = x.gather(1, keep.indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, D)
            padding_mask = keep.padding
        attn_mask = None
        if padding_mask is not None:
            attn_mask = (~padding_mask).view(x.shape[0], 1, 1, x.shape[1])  # (B, 1, 1, T): True = attend
        if self.alibi is not None:
            positions = keep.indices if keep is not None else torch.arange(x.shape[1], device=x.device).unsqueeze(0)
            bias = self.alibi(positions)  # (B | 1, H, T, T)
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
        if not self.layer_norm_first:
            x = self.norm(x)
        return self.dropout(x), attn_mask

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        *,
        layerdrop_generator: torch.Generator | None = None,
        keep: KeptFrames | None = None,
    ) -> Tensor:
        """(B, T, D) -> (B, T, D), or (B, K, D) for the ``keep`` frames (positions are
        embedded over all T frames first)."""
        x, attn_mask = self._inputs(x, padding_mask, keep)
        recompute = self.checkpoint_activations and torch.is_grad_enabled()
        extra = self._bias_args(x, keep)
        for layer, kept in zip(self.layers, self.kept_layers(layerdrop_generator), strict=True):
            if kept and recompute:
                # Non-reentrant: the RNG is restored for the recomputation, so dropout matches.
                x = checkpoint(layer, x, attn_mask, *extra, use_reentrant=False)
            elif kept:
                x = layer(x, attn_mask, *extra)
        if self.layer_norm_first:
            x = self.norm(x)
        return x

    def ffn_outputs(self, x: Tensor, padding_mask: Tensor | None = None) -> list[Tensor]:
        """Every layer's feed-forward output before its residual, each (B, T, D): what a
        data2vec teacher averages. Every layer runs (LayerDrop is for training; a teacher
        is in eval mode). Each layer is called as a module, so ZeRO-3 gathers its weights."""
        x, attn_mask = self._inputs(x, padding_mask, None)
        extra = self._bias_args(x, None)
        outputs = []
        for layer in self.layers:
            x, ffn = layer(x, attn_mask, *extra, return_ffn=True)
            outputs.append(ffn)
        return outputs
