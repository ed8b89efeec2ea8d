"""Explicit, rank-aware seeds: every random draw of a step is a function of the step.

A resumed run therefore draws exactly what the uninterrupted run drew, without
restoring generator states, and the draws that must agree across ranks do.

- masks and distractors: ``(seed, step, rank, micro-step)``: different on every rank
  and micro-batch, reproducible after a resume;
- LayerDrop: ``(seed, step)``: the same layers are dropped on every rank (under ZeRO-3 a
  rank that skipped a layer would skip that layer's parameter all-gathers and deadlock);
- the global torch RNG (dropout): ``(seed, step, rank)``, set at the start of a step.
"""

from __future__ import annotations

import hashlib

import torch

_MASK, _LAYERDROP, _GLOBAL = 1, 2, 3


def mix(*parts: int) -> int:
    """A 63-bit seed from integers, well spread even for neighbouring inputs."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def mask_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """Generator for masks and distractors of one micro-batch on one rank."""
    return torch.Generator(device=device).manual_seed(mix(_MASK, seed, step, rank, micro))


def layerdrop_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator for LayerDrop: identical on every rank for a given step.

    On the CPU because the model reads the keep/drop decisions on the host; a CPU draw
    never waits on the accelerator.
    """
    return torch.Generator(device="cpu").manual_seed(mix(_LAYERDROP, seed, step))


def seed_global_rng(seed: int, step: int, rank: int) -> None:
    """Seed torch's global RNG (dropout and anything else not given a generator)."""
    torch.manual_seed(mix(_GLOBAL, seed, step, rank))
