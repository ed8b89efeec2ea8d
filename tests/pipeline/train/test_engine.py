"""The DeepSpeed engine as configured: bf16 really reaches the forward, regional compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.factory import build_pretraining_model
from pipeline import config as C
from pipeline.train import engine as E
from pipeline.train.loop import LoopHooks, TrainLoop
from pipeline.train.pretrain import PretrainStep


@pytest.fixture(scope="module", autouse=True)
def process_group():
    E.ensure_process_group("gloo")


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"source": rng.standard_normal((2, 8000)).astype(np.float32), "padding_mask": np.zeros((2, 8000), bool)}


@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_autocast_survives_the_deepspeed_forward(stage: int) -> None:
    """On CUDA, DeepSpeed's engine disables an outer autocast unless its own
    ``torch_autocast`` is on. So the engine must apply bf16 itself (checked here without
    the loop's outer context, as the GPU path effectively runs) and keep it inside the
    loop's context; parameters and gradients stay fp32."""
    cfg = C.apply_overrides(C.preset_config("tiny"), ["train.precision=bf16", f"deepspeed.zero_stage={stage}"])
    assert E.deepspeed_config(cfg, 1, torch.bfloat16)["torch_autocast"]["lower_precision_safe_modules"] == []
    torch.manual_seed(0)
    model = build_pretraining_model(cfg.model)
    eng = E.build_engine(cfg, model)
    assert eng.autocast is torch.bfloat16
    task = PretrainStep(cfg, model)
    prepared = task.prepare(_batch(), step=0, micro=0, rank=0, device=eng.device)
    task.begin_update(eng.module, 0)
    seen: list[torch.dtype] = []
    hook = eng.module.final_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    task.forward(eng.engine, prepared, step=0)  # the engine's own autocast
    with eng.autocast_context():
        out = task.forward(eng.engine, prepared, step=0)
    hook.remove()
    assert seen == [torch.bfloat16, torch.bfloat16]
    eng.engine.backward(out.loss_sum.float())
    assert all(p.dtype == torch.float32 for p in eng.module.parameters())

    fp32 = C.apply_overrides(cfg, ["train.precision=fp32"])
    assert "torch_autocast" not in E.deepspeed_config(fp32, 1, E.autocast_dtype(fp32, torch.device("cpu")))


def _losses(cfg: C.Config, compiled: bool, updates: int) -> list[float]:
    torch.manual_seed(cfg.train.seed)
    model = build_pretraining_model(cfg.model)
    if compiled:
        assert E.apply_regional_compile(model, backend="eager") == 1 + cfg.model.transformer.num_layers
    eng = E.build_engine(cfg, model)
    losses: list[float] = []

    class Record(LoopHooks):
        def on_log(self, step, metrics, alarms):
            losses.append(metrics["loss"])

    def batches():
        i = 0
        while True:
            yield _batch(i % 2)
            i += 1

    TrainLoop(cfg, eng, PretrainStep(cfg, eng.module), hooks=Record()).run(batches())
    assert len(losses) == updates
    return losses


def test_regional_compile_keeps_the_losses_and_does_not_recompile_per_update() -> None:
    """LayerDrop picks different layers each update; compiling regions (not the model)
    keeps that choice, and the generators, out of the graphs."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    updates = 6
    cfg = C.apply_overrides(C.preset_config("tiny"), [
        "model.transformer.layerdrop=0.5", f"train.max_steps={updates}", "train.log_every=1",
        "train.precision=fp32", "deepspeed.zero_stage=0",
    ])
    eager = _losses(cfg, compiled=False, updates=updates)
    torch._dynamo.reset()
    counters.clear()
    compiled = _losses(cfg, compiled=True, updates=updates)
    np.testing.assert_allclose(compiled, eager, rtol=1e-5)
    regions = 1 + cfg.model.transformer.num_layers
    # one graph per region and input shape (train/no-grad variants at most double it)
    assert counters["stats"]["unique_graphs"] <= 2 * regions, dict(counters["stats"])


@pytest.mark.parametrize("kind", ["transformer", "conformer"])
def test_activation_checkpointing_recomputes_the_same_gradients(kind: str) -> None:
    """``train.activation_checkpointing`` is the encoders' own recomputation: the same loss and
    gradients as keeping the activations (dropout on, so the restored RNG matters)."""
    grads = []
    for recompute in (False, True):
        cfg = C.apply_overrides(C.preset_config("tiny"), [
            f"model.transformer.kind={kind}", "model.transformer.dropout=0.1", "model.transformer.layer_norm_first=true",
            f"train.activation_checkpointing={str(recompute).lower()}",
        ])
        torch.manual_seed(0)
        model = build_pretraining_model(cfg.model)
        eng = E.build_engine(cfg, model)
        encoder = eng.module.encoder.transformer
        assert encoder.checkpoint_activations is recompute
        task = PretrainStep(cfg, model)
        prepared = task.prepare(_batch(), step=0, micro=0, rank=0, device=eng.device)
        task.begin_update(eng.module, 0)
        torch.manual_seed(1)
        out = task.forward(eng.engine, prepared, step=0)
        eng.engine.backward(out.loss_sum.float())
        grads.append((float(out.loss_sum), {n: p.grad.clone() for n, p in eng.module.named_parameters()
                                             if p.grad is not None}))
    (loss_a, a), (loss_b, b) = grads
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
