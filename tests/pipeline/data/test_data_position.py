"""The data position: what workers consumed, merged, compacted and saved as JSON."""

from __future__ import annotations

import json

import pytest

from pipeline.data.position import DataPosition


def _batch(epoch: int, shard: int, index: int, num_batches: int, num_shards: int = 3, plan: str = "p") -> dict:
    return {"epoch": epoch, "shard": shard, "batch_index": index, "num_batches": num_batches,
            "num_shards": num_shards, "plan": plan}


def test_ranks_merge_into_finished_units_and_epochs() -> None:
    rank0, rank1 = DataPosition(), DataPosition()
    # epoch 0: shards 0..2 with 2 batches each, split between ranks; epoch 1: shard 1 half done
    for shard in range(3):
        rank0.update(_batch(0, shard, 0, 2))
        rank1.update(_batch(0, shard, 1, 2))
    rank0.update(_batch(1, 1, 3, 4))
    assert len(rank0) > 0 and not rank0.unit_done(0, 0)
    merged = DataPosition.merge([rank0.state_dict(), rank1.state_dict(), None])
    json.dumps(merged)  # plain JSON
    pos = DataPosition(merged)
    assert pos.epochs_done == 1 and pos.epoch == 1
    assert merged["partial"] == {"1/1": {"num_batches": 4, "seen": [3]}}
    assert pos.contains(0, 2, 1) and pos.contains(1, 1, 3)
    assert not pos.contains(1, 1, 0) and not pos.contains(1, 0, 3)
    assert pos.seen_batches(1, 1) == {3}


def test_state_round_trip_and_merge_is_idempotent() -> None:
    p = DataPosition()
    for i in range(5):
        p.update(_batch(2, 1, i, 6))
    p.update(_batch(2, 0, 0, 1))
    state = p.state_dict()
    assert DataPosition(state).state_dict() == state
    assert DataPosition.merge([state, state]) == DataPosition.merge([state])
    assert state["done"] == {"2": [0]}


def test_positions_of_different_plans_do_not_mix() -> None:
    a, b = DataPosition(), DataPosition()
    a.update(_batch(0, 0, 0, 2, plan="v1/train/x"))
    b.update(_batch(0, 0, 1, 2, plan="v1/train/y"))
    with pytest.raises(ValueError, match="plan"):
        DataPosition.merge([a.state_dict(), b.state_dict()])
    with pytest.raises(ValueError, match="dataset"):
        a.update(_batch(0, 0, 1, 2, plan="v2/train/x"))
    with pytest.raises(ValueError, match="version"):
        DataPosition({"version": 99})


def test_new_batching_settings_restart_unfinished_units() -> None:
    p = DataPosition()
    p.update(_batch(0, 0, 0, 1, plan="v1/train/x"))  # unit (0, 0) finished
    p.update(_batch(0, 1, 0, 3, plan="v1/train/x"))  # unit (0, 1) partial
    p.update(_batch(0, 2, 0, 5, plan="v1/train/y"))  # resumed with other batching
    state = p.state_dict()
    assert state["plan"] == "v1/train/y" and state["done"] == {"0": [0]}
    assert state["partial"] == {"0/2": {"num_batches": 5, "seen": [0]}}
