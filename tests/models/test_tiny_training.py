"""The tiny preset learns: 200 Adam steps on synthetic audio drive the loss well below chance."""

from __future__ import annotations

import math

import torch
from conftest import symbol_audio

from models import config as presets
from models.factory import build_pretraining_model


def test_tiny_preset_beats_chance_in_200_steps():
    cfg = presets.tiny()
    num_negatives = cfg.loss.num_negatives
    chance = math.log(num_negatives + 1)  # 3.04 nats for K = 20
    torch.manual_seed(0)
    model = build_pretraining_model(cfg).train()
    # the optimiser of the recipe (SPEC.md) at the tiny run's learning rate
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.98), eps=1e-6)
    data = symbol_audio(32, 2.0, torch.Generator().manual_seed(0))  # 32 utterances of 2 s
    gen = torch.Generator().manual_seed(1)
    losses, accuracy, perplexity = [], [], []
    for step in range(200):
        model.set_num_updates(step)
        batch = data[torch.randint(0, data.shape[0], (4,), generator=gen)]
        out = model(batch, generator=gen)
        loss = out.loss_sum / out.num_masked
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(out.contrastive_sum.detach() / out.num_masked))
        accuracy.append(float(out.num_correct / out.num_masked))
        perplexity.append(out.prob_perplexity.detach())

    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"contrastive loss per masked frame: first 20 steps {first:.3f}, last 20 {last:.3f}, chance {chance:.3f}")
    assert first > 0.9 * chance, "starts near chance"
    assert last < 0.75 * chance, f"last 20 steps average {last:.3f} nats, chance is {chance:.3f}"
    assert sum(accuracy[-20:]) / 20 > 4 / (num_negatives + 1)
    # not a collapsed codebook (identical codes would make distractors -inf and the task trivial)
    assert (torch.stack(perplexity[-20:]).mean(0) > 5).all()
