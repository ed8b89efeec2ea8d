"""What wavray relies on in DeepSpeed beyond its documented API, in one place.

Upgrading DeepSpeed should break this module and its test
(``tests/pipeline/train/test_deepspeed_compat.py``), not a run:

- :func:`skip_cpu_shm_comm_op`: DeepSpeed builds its CPU shared-memory all-reduce op
  (``deepspeed_shm_comm``, about 50 s of compiling) when its comm backend starts, and
  uses it only for ``inference_all_reduce``; training collectives go through the torch
  process group. ``deepspeed.ops.__compatible_ops__`` is the table DeepSpeed consults
  before building (computed once per process), so marking the op unavailable there
  before ``deepspeed.initialize`` keeps every worker from compiling it.
- :func:`consolidated_state_dict`: under ZeRO-3 the full weights are gathered by the
  engine's ``_zero3_consolidated_16bit_state_dict`` (what ``save_16bit_model`` calls),
  collective, the result on rank 0 only.
- :func:`checkpoint_file_patterns`: the file names DeepSpeed gives the parts of a
  checkpoint tag, by which a checkpoint is known complete: the model states
  (``mp_rank_<mp>_model_states.pt`` once, or under ZeRO-3 one
  ``zero_pp_rank_<r>_mp_rank_<mp>_model_states.pt`` per rank: ``load_checkpoint`` finds
  none and fails on a bare assertion) and each rank's ZeRO optimizer shard
  (``*zero_pp_rank_<r>_*optim_states.pt``).
- ZeRO-3 re-gathers a module's partitioned parameters for its backward through hooks on
  the tensors the module returns, found only inside tensors, tuples (named ones
  included), lists and dicts: the models return named tuples for that reason
  (``models/wav2vec2.py``); the test pins it.
- :func:`local_tensors`: a parameter trained outside the optimizer (data2vec's EMA
  teacher) is updated on what each rank holds of it. Under ZeRO-3 that is its partition
  ``ds_tensor`` (a flat 1-D slice of ``ceil(numel / world)`` values, padded at the end,
  laid out by ``numel`` alone, so a teacher parameter's slice lines up with its
  student's), plus the whole tensor where DeepSpeed keeps it gathered between steps
  (its "persistent" parameters, below ``stage3_param_persistence_threshold``), unless
  that whole tensor is the partition's own memory (one rank). The
  optimizer writes the student's new values into both before ``engine.step()``
  returns. ZeRO-3 partitions parameters the optimizer does not own too, and its
  checkpoints save and restore each rank's partition of them
  (``frozen_param_fragments`` in every rank's model-states file); ZeRO-0/1/2 keep them
  whole in the module state. The test pins all of it.
"""

from __future__ import annotations

from typing import Any

import torch


def skip_cpu_shm_comm_op() -> None:
    """Mark DeepSpeed's CPU shared-memory comm op unavailable so it is never compiled."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def consolidated_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The full model state dict on rank 0 (None elsewhere); collective under ZeRO-3."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank != 0:
        return None
    return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def checkpoint_file_patterns(zero_stage: int, world_size: int) -> list[str]:
    """Globs, one per required file, that a complete DeepSpeed checkpoint tag folder written
    at ``zero_stage`` by ``world_size`` ranks matches (module doc)."""
    if zero_stage >= 3:
        patterns = [f"zero_pp_rank_{r}_mp_rank_*_model_states.pt" for r in range(world_size)]
    else:
        patterns = ["mp_rank_*_model_states.pt"]
    if zero_stage >= 1:
        patterns += [f"*zero_pp_rank_{r}_*optim_states.pt" for r in range(world_size)]
    return patterns


def local_tensors(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The tensors holding this rank's values of ``params``, to update in place outside the
    optimizer: each parameter itself, or under ZeRO-3 its partition and, where DeepSpeed
    keeps it gathered, the whole tensor too (module doc). Two lists of parameters of equal
    shapes and equal persistence give lists that line up element by element."""
    out: list[torch.Tensor] = []
    for p in params:
        partition = getattr(p, "ds_tensor", None)
        if partition is None:
            out.append(p.data)
            continue
        out.append(partition.data)
        # Gathered and kept (a persistent parameter) in memory of its own: write it too. On
        # one rank the gathered tensor may be the partition's own storage; writing it twice
        # would apply an update twice.
        if p.data.numel() > 0 and p.data.untyped_storage().data_ptr() != partition.untyped_storage().data_ptr():
            out.append(p.data)
    return out
