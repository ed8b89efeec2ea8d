"""Pins of what wavray relies on in DeepSpeed beyond its documented API
(``pipeline/train/deepspeed_compat.py``): upgrading DeepSpeed fails here first."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from models.factory import build_pretraining_model
from pipeline import config as C
from pipeline.train import deepspeed_compat as DC
from pipeline.train import engine as E


@pytest.fixture(scope="module", autouse=True)
def process_group():
    E.ensure_process_group("gloo")


def test_the_cpu_comm_op_is_in_the_table_deepspeed_consults() -> None:
    import deepspeed.ops

    assert "deepspeed_shm_comm" in deepspeed.ops.__compatible_ops__
    DC.skip_cpu_shm_comm_op()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False


class _Out(NamedTuple):
    value: torch.Tensor
    other: torch.Tensor | None


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(300, 300)

    def forward(self, x: torch.Tensor) -> _Out:
        return _Out(self.inner(x), None)


def _engine(stage: int, model: torch.nn.Module) -> E.Engine:
    cfg = C.apply_overrides(C.tiny(), [f"deepspeed.zero_stage={stage}", "deepspeed.zero3_persistence_threshold=0"])
    return E.build_engine(cfg, model)


def test_zero3_regathers_parameters_through_named_tuple_outputs() -> None:
    """ZeRO-3 hooks the tensors a module returns; inside a named tuple they are found, so
    the partitioned weight is gathered again for the backward and gets its gradient."""
    torch.manual_seed(0)
    eng = _engine(3, _Tiny())
    assert eng.module.inner.weight.numel() == 0, "ZeRO-3 partitions the weight outside its forward"
    out = eng.engine(torch.randn(4, 300))
    assert isinstance(out, _Out)
    eng.engine.backward(out.value.square().sum())
    eng.engine.step()
    full = DC.consolidated_state_dict(eng.engine, 3)
    assert full is not None and tuple(full["inner.weight"].shape) == (300, 300)


def test_consolidated_state_dict_and_optimizer_file_names(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = C.apply_overrides(C.tiny(), ["deepspeed.zero_stage=1"])
    model = build_pretraining_model(cfg.model)
    eng = E.build_engine(cfg, model)
    state = DC.consolidated_state_dict(eng.engine, 1)
    assert state is not None and state.keys() == model.state_dict().keys()
    eng.engine.save_checkpoint(str(tmp_path), tag="t", save_latest=False)
    assert DC.optimizer_state_files(tmp_path / "t", 0), list((tmp_path / "t").iterdir())
    assert not DC.optimizer_state_files(tmp_path / "t", 1)
    assert hasattr(type(eng.engine), "_zero3_consolidated_16bit_state_dict")
