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


def test_zero3_checkpoint_file_names(tmp_path) -> None:
    """The names a complete ZeRO-3 tag is known by, and that ``load_checkpoint`` needs them."""
    torch.manual_seed(0)
    eng = _engine(3, _Tiny())
    eng.engine.save_checkpoint(str(tmp_path), tag="t", save_latest=False)
    tag = tmp_path / "t"
    patterns = DC.checkpoint_file_patterns(3, 1)
    assert len(patterns) == 2 and all(any(tag.glob(p)) for p in patterns), list(tag.iterdir())
    for f in tag.glob(patterns[0]):
        f.unlink()
    with pytest.raises(AssertionError):  # what a tag without its model states gives DeepSpeed
        eng.engine.load_checkpoint(str(tmp_path), tag="t")


def test_consolidated_state_dict_and_optimizer_file_names(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = C.apply_overrides(C.tiny(), ["deepspeed.zero_stage=1"])
    model = build_pretraining_model(cfg.model)
    eng = E.build_engine(cfg, model)
    state = DC.consolidated_state_dict(eng.engine, 1)
    assert state is not None and state.keys() == model.state_dict().keys()
    eng.engine.save_checkpoint(str(tmp_path), tag="t", save_latest=False)
    tag = tmp_path / "t"
    assert all(any(tag.glob(p)) for p in DC.checkpoint_file_patterns(1, 1)), list(tag.iterdir())
    assert not all(any(tag.glob(p)) for p in DC.checkpoint_file_patterns(1, 2)), "a second rank's shard matched"
    (tag / "mp_rank_00_model_states.pt").unlink()
    assert not all(any(tag.glob(p)) for p in DC.checkpoint_file_patterns(1, 1)), "no model states matched"
    assert hasattr(type(eng.engine), "_zero3_consolidated_16bit_state_dict")


class _WithFrozenCopy(torch.nn.Module):
    """A trained layer, a frozen copy of it (a data2vec teacher's shape) and a small one of each."""

    def __init__(self) -> None:
        super().__init__()
        self.student = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Linear(300, 4))
        self.teacher = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Linear(300, 4)).requires_grad_(False)
        self.teacher.load_state_dict(self.student.state_dict())

    def forward(self, x: torch.Tensor) -> _Out:
        with torch.no_grad():
            t = self.teacher(x)
        return _Out(self.student(x), t)


@pytest.mark.parametrize("persistence", [0, 1000])
def test_zero3_partitions_a_frozen_copy_updates_it_in_place_and_restores_each_ranks_part(tmp_path, persistence) -> None:
    """What data2vec's teacher relies on (``local_tensors``): ZeRO-3 partitions parameters
    the optimizer does not own, the student's partition holds its new values once
    ``step()`` returns, an update written into ``local_tensors`` is what the next forward
    and the consolidated state see (parameters below the persistence threshold stay
    gathered: their whole tensor is written too), and a checkpoint brings each rank's
    partition back."""
    from models.data2vec import ema_update_

    torch.manual_seed(0)
    cfg = C.apply_overrides(C.tiny(), ["deepspeed.zero_stage=3", f"deepspeed.zero3_persistence_threshold={persistence}"])
    eng = E.build_engine(cfg, _WithFrozenCopy())
    module = eng.module
    big = module.teacher[0].weight
    assert big.numel() == 0 and big.ds_tensor.numel() >= 90000, "the frozen copy is partitioned too"
    x = torch.randn(5, 300)
    out = eng.engine(x)
    eng.engine.backward(out.value.square().sum())
    eng.optimizer.found_inf = torch.zeros(())
    eng.engine.step()
    student = list(module.student.parameters())
    teacher = list(module.teacher.parameters())
    t_local, s_local = DC.local_tensors(teacher), DC.local_tensors(student)
    assert [t.shape for t in t_local] == [s.shape for s in s_local]
    gathered_small = [p for p in teacher if p.data.numel() > 0]
    assert (len(gathered_small) > 0) == (persistence > 0)
    own_memory = [p for p in gathered_small if p.data.untyped_storage().data_ptr() != p.ds_tensor.untyped_storage().data_ptr()]
    assert len(t_local) == len(teacher) + len(own_memory)
    # (on the CPU the consolidated tensors of gathered parameters are those parameters: copy them)
    before = {k: v.clone() for k, v in DC.consolidated_state_dict(eng.engine, 3).items()}
    ema_update_(t_local, s_local, 0.25)
    after = {k: v.clone() for k, v in DC.consolidated_state_dict(eng.engine, 3).items()}
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        want = 0.25 * before[f"teacher.{name}"] + 0.75 * after[f"student.{name}"]
        assert torch.allclose(after[f"teacher.{name}"], want, atol=1e-6), name
        assert not torch.equal(after[f"student.{name}"], before[f"teacher.{name}"]), "the student had moved"
        assert not torch.equal(after[f"teacher.{name}"], before[f"teacher.{name}"]), "the teacher moved"
    with torch.no_grad():
        reference = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Linear(300, 4))
        reference.load_state_dict({k[len("teacher."):]: v for k, v in after.items() if k.startswith("teacher.")})
        assert torch.allclose(eng.engine(x).other, reference(x), atol=1e-5), "the next forward uses the update"
    eng.engine.save_checkpoint(str(tmp_path), tag="t", save_latest=False)
    torch.manual_seed(7)
    eng2 = E.build_engine(cfg, _WithFrozenCopy())
    eng2.engine.load_checkpoint(str(tmp_path), tag="t", load_optimizer_states=True, load_lr_scheduler_states=False)
    restored = DC.consolidated_state_dict(eng2.engine, 3)
    assert all(torch.equal(restored[k], v) for k, v in after.items() if k.startswith("teacher."))
    with torch.no_grad():
        assert torch.equal(eng2.engine(x).other, eng.engine(x).other)


def test_outside_zero3_local_tensors_are_the_parameters() -> None:
    model = _WithFrozenCopy()
    params = list(model.teacher.parameters())
    assert all(t is p.data or t.data_ptr() == p.data_ptr() for t, p in zip(DC.local_tensors(params), params,
                                                                             strict=True))
