"""Global loss normalisation: the same frames give the same loss and gradients however
they are split over ranks and accumulation steps.

(batch 8, accumulation 1), (batch 4, accumulation 2) and (2 ranks x batch 4 under ZeRO-2)
must agree.
Exact by construction: the model runs in eval mode (the Gumbel noise would otherwise be
drawn per micro-batch shape), every configuration gets the same explicit
``mask_time_indices``/``negative_indices``, and the diversity and feature-penalty
weights are 0 for the equality (fairseq's form makes both per-micro-batch statistics).
The rows have different lengths, so the two halves have different numbers of masked
frames: a loop that averaged per-micro-batch means would fail. A second test checks the
full objective (all weights on) against a direct autograd reference.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from models.factory import build_pretraining_model
from pipeline import config as C
from pipeline.net import free_port
from pipeline.train import engine as E
from pipeline.train.loop import LoopHooks, TrainLoop
from pipeline.train.pretrain import PretrainStep

LENGTHS = [16000, 12000, 16000, 9000, 16000, 14000, 11000, 16000]


def _cfg(accum: int, *, weights: bool, zero: int = 0) -> C.Config:
    over = [f"train.grad_accum={accum}", f"deepspeed.zero_stage={zero}", "optim.clip_grad_norm=0.0"]
    if not weights:
        over += ["model.loss.diversity_weight=0.0", "model.loss.feature_penalty_weight=0.0"]
    return C.apply_overrides(C.tiny(), over)


def _batch8(cfg: C.Config) -> dict[str, np.ndarray]:
    """8 rows of different lengths with fixed masks and distractors."""
    rng = np.random.default_rng(0)
    width = max(LENGTHS)
    source = rng.standard_normal((8, width)).astype(np.float32)
    pad = np.arange(width)[None, :] >= np.asarray(LENGTHS)[:, None]
    source[pad] = 0.0
    model = build_pretraining_model(cfg.model)
    fe = model.encoder.feature_encoder
    frames = int(fe.output_lengths(torch.tensor(width)))
    lengths = fe.output_lengths(torch.tensor(LENGTHS))
    mask, neg = model.sample_masks(8, frames, lengths, torch.Generator().manual_seed(1))
    return {
        "source": source, "padding_mask": pad,
        "mask_time_indices": mask.numpy(), "negative_indices": neg.numpy(),
    }


def _rows(batch: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
    return {k: v[lo:hi] for k, v in batch.items()}


class _Grab(LoopHooks):
    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.grads: dict[str, torch.Tensor] = {}

    def on_gradients(self, step: int) -> None:
        from deepspeed.utils import safe_get_full_grad

        for name, p in self.module.named_parameters():
            g = safe_get_full_grad(p)
            self.grads[name] = (g if g is not None else torch.zeros_like(p)).detach().clone().float()


def one_update(cfg: C.Config, micro_batches: list[dict[str, np.ndarray]]) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and reduced gradients of the first update of a fresh model on this rank."""
    torch.manual_seed(0)
    model = build_pretraining_model(cfg.model)
    eng = E.build_engine(cfg, model)
    eng.engine.eval()  # no Gumbel noise: see the module docstring
    hooks = _Grab(eng.module)
    loop = TrainLoop(cfg, eng, PretrainStep(cfg, model), hooks=hooks)
    loop.train_step(iter(micro_batches))
    metrics = loop.flush()
    return metrics["loss"], hooks.grads


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    cfg = _cfg(1, weights=False, zero=2)  # ZeRO-2: reduce-scatter instead of all-reduce, same sums
    batch = _batch8(cfg)
    loss, grads = one_update(cfg, [_rows(batch, 4 * rank, 4 * rank + 4)])
    if rank == 0:
        torch.save({"loss": loss, "grads": grads}, out)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def single_process_group():
    E.ensure_process_group("gloo")
    yield


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{what}: {n}: {m}")


def test_batch8_equals_batch4_accum2_equals_two_ranks(single_process_group, tmp_path: Path) -> None:
    cfg1 = _cfg(1, weights=False)
    batch = _batch8(cfg1)
    halves = [_rows(batch, 0, 4), _rows(batch, 4, 8)]
    counts = [int(h["mask_time_indices"].sum()) for h in halves]
    assert counts[0] != counts[1], "the test needs micro-batches with different masked-frame counts"

    loss_a, grads_a = one_update(cfg1, [batch])
    loss_b, grads_b = one_update(_cfg(2, weights=False), halves)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    _assert_same(grads_a, grads_b, "(8, 1) vs (4, 2)")
    assert any(g.abs().sum() > 0 for g in grads_a.values())

    out = tmp_path / "rank0.pt"
    port = free_port()
    torch.multiprocessing.spawn(_rank_main, args=(port, str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    assert loss_a == pytest.approx(two["loss"], rel=1e-6)
    _assert_same(grads_a, two["grads"], "(8, 1) vs 2 ranks x (4, 1), ZeRO-2")

    # A per-micro-batch mean would weigh the halves equally: show the test would see it.
    means = [h / c for h, c in zip(_half_sums(cfg1, halves), counts, strict=True)]
    assert abs(sum(means) / 2 - loss_a) > 1e-4


def _half_sums(cfg: C.Config, halves: list[dict[str, np.ndarray]]) -> list[float]:
    torch.manual_seed(0)
    model = build_pretraining_model(cfg.model).eval()
    step = PretrainStep(cfg, model)
    sums = []
    with torch.no_grad():
        for h in halves:
            p = step.prepare(h, step=0, micro=0, rank=0, device=torch.device("cpu"))
            sums.append(float(step.forward(model, p, step=0).loss_sum))
    return sums


def test_full_objective_matches_direct_autograd(single_process_group) -> None:
    """With every loss term on, the loop's update gradient is grad(sum of loss sums) / N."""
    cfg = _cfg(2, weights=True)
    batch = _batch8(cfg)
    halves = [_rows(batch, 0, 4), _rows(batch, 4, 8)]
    loss, grads = one_update(cfg, halves)

    torch.manual_seed(0)
    model = build_pretraining_model(cfg.model).eval()
    step = PretrainStep(cfg, model)
    model.set_num_updates(0)
    outs = [step.forward(model, step.prepare(h, step=0, micro=m, rank=0, device=torch.device("cpu")), step=0)
            for m, h in enumerate(halves)]
    total = sum(o.loss_sum for o in outs) / sum(o.count for o in outs).float()
    total.backward()
    ref = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    assert loss == pytest.approx(float(total), rel=1e-6)
    _assert_same(ref, grads, "loop vs autograd reference")
