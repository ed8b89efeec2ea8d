"""Seeds: masks differ per rank and micro-batch and repeat per step; LayerDrop agrees across ranks."""

from __future__ import annotations

import torch

from models.factory import build_pretraining_model
from pipeline import config as C
from pipeline.train import seeding


def test_mask_generators_are_per_rank_micro_and_reproducible() -> None:
    cpu = torch.device("cpu")

    def draw(step: int, rank: int, micro: int) -> torch.Tensor:
        return torch.rand(8, generator=seeding.mask_generator(1, step, rank, micro, cpu))

    assert torch.equal(draw(5, 0, 0), draw(5, 0, 0))
    assert not torch.equal(draw(5, 0, 0), draw(5, 1, 0))
    assert not torch.equal(draw(5, 0, 0), draw(5, 0, 1))
    assert not torch.equal(draw(5, 0, 0), draw(6, 0, 0))


def test_layerdrop_draws_are_the_same_on_every_rank() -> None:
    cfg = C.apply_overrides(C.tiny(), ["model.transformer.num_layers=6", "model.transformer.layerdrop=0.5"])
    model = build_pretraining_model(cfg.model).train()
    layers = model.encoder.transformer
    per_step = []
    for step in range(8):
        # Two "ranks" build their generator from (seed, step) alone: identical decisions.
        a = layers.kept_layers(seeding.layerdrop_generator(1, step))
        b = layers.kept_layers(seeding.layerdrop_generator(1, step))
        assert a == b
        per_step.append(tuple(a))
    assert len(set(per_step)) > 1, "LayerDrop should vary from step to step"
