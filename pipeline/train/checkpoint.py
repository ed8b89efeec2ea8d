"""Training checkpoints: what one holds, how every rank writes its part, how a run resumes.

A checkpoint is one directory (Ray Train merges the ranks' folders into it)::

    config.yaml            rank 0: the resolved config          } a wavray model checkpoint:
    model.safetensors      rank 0: the consolidated model       } ``jobs.export`` works on it
    deepspeed/<tag>/...    every rank: DeepSpeed's engine state (module, optimizer shards)
    rng/rank_<r>.pt        every rank: torch / numpy / python RNG states
    trainer_state.json     rank 0, written last: step, skipped steps, world size, ZeRO
                           stage, the DeepSpeed tag and the data position merged over ranks

The learning-rate schedule is a function of the step and the Gumbel temperature is a
buffer inside the model state, so both come back with the step and the engine state.
Masks, distractors, LayerDrop and dropout are seeded from (seed, step, rank), so the RNG
files are a belt on top of braces.

Atomicity: a checkpoint is complete only when its last file, ``trainer_state.json``, is
there. :func:`upload` makes that true in storage: every rank copies its files (each
object appears whole), all ranks meet, and only then does rank 0 write the state file;
an upload cut anywhere before leaves a folder without it, which nothing takes for a
checkpoint. Under Ray Train a checkpoint also counts only once every rank has reported it
and the controller has recorded it in its snapshot; a crash before that leaves the run
resuming from the previous one. :func:`validate` additionally refuses a directory
without ``trainer_state.json`` or missing a rank's DeepSpeed files, and
:func:`latest_complete` skips such directories when scanning storage.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import WEIGHTS_NAME, save_weights
from pipeline.config import CONFIG_FILE, Config, save_config
from pipeline.data import storage
from pipeline.train.deepspeed_compat import checkpoint_file_patterns, consolidated_state_dict

STATE_FILE = "trainer_state.json"
DS_DIR = "deepspeed"
RNG_DIR = "rng"
FORMAT_VERSION = 1
CHECKPOINT_DIR_RE = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    """Name of the checkpoint of update ``step`` in the run's storage folder."""
    return f"checkpoint_{step:09d}"


def ds_tag(step: int) -> str:
    return f"step_{step:09d}"


@dataclass
class TrainerState:
    """The loop's own state in a checkpoint (``trainer_state.json``)."""

    step: int
    skipped_steps: int
    world_size: int
    zero_stage: int
    tag: str
    data_position: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    """Seconds of training up to this checkpoint, resumes included (``train.max_seconds``)."""
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1, sort_keys=True, allow_nan=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> TrainerState:
        try:
            data = json.loads(text)
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {data.get('version')!r}, expected {FORMAT_VERSION}")
            return cls(**data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: not a wavray trainer state ({e})") from None


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain lists: loadable with ``weights_only=True``."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_rest": [int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python": [int(py_version), list(py_state), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in py_state), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    out_dir: str | os.PathLike,
    *,
    cfg: Config,
    engine: Any,
    step: int,
    skipped_steps: int,
    data_position: dict[str, Any] | None,
    metrics: dict[str, float] | None = None,
    train_seconds: float = 0.0,
) -> Path:
    """Write this rank's part of the checkpoint of update ``step`` into ``out_dir``.

    Every rank must call it (DeepSpeed's save and the ZeRO-3 gather are collective).
    ``data_position`` is the state merged over ranks (rank 0's argument is what is saved).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    zero_stage = int(engine.zero_optimization_stage())
    tag = ds_tag(step)
    engine.save_checkpoint(str(out / DS_DIR), tag=tag, client_state={"step": step}, save_latest=False)
    state_dict = consolidated_state_dict(engine, zero_stage)
    (out / RNG_DIR).mkdir(exist_ok=True)
    torch.save(_rng_state(), out / RNG_DIR / f"rank_{rank}.pt")
    if rank == 0:
        assert state_dict is not None
        save_weights(state_dict, out)
        save_config(cfg, out / CONFIG_FILE)
        state = TrainerState(
            step=step, skipped_steps=skipped_steps, world_size=world_size, zero_stage=zero_stage, tag=tag,
            data_position=data_position, metrics={k: float(v) for k, v in (metrics or {}).items()},
            train_seconds=float(train_seconds),
        )
        tmp = out / f".{STATE_FILE}.tmp"
        tmp.write_text(state.to_json())
        os.replace(tmp, out / STATE_FILE)  # last: marks the directory complete
    return out


def upload(local_dir: str | os.PathLike, dest_uri: str, store: storage.Storage | None = None, *, rank: int) -> None:
    """Copy this rank's part of a checkpoint from ``local_dir`` to ``dest_uri``, the state file last.

    Every rank calls it (it is collective): each copies its files except ``trainer_state.json``
    (an object appears whole; a store that goes away is retried for ``data.s3_retry_seconds``),
    all ranks meet, then rank 0 writes the state file, which marks the checkpoint complete.
    """
    local = Path(local_dir)
    for path in sorted(p for p in local.rglob("*") if p.is_file() and p.name != STATE_FILE):
        storage.upload_file(path, storage.join(dest_uri, path.relative_to(local).as_posix()), store)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        storage.upload_file(local / STATE_FILE, storage.join(dest_uri, STATE_FILE), store)


def read_state(ckpt_dir: str | os.PathLike) -> TrainerState:
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise ValueError(f"checkpoint {str(ckpt_dir)!r}: {STATE_FILE} missing (an incomplete save?)")
    return TrainerState.from_json(path.read_text(), str(path))


def validate(ckpt_dir: str | os.PathLike) -> TrainerState:
    """The trainer state of a complete checkpoint; ``ValueError`` naming what is missing."""
    d = Path(ckpt_dir)
    state = read_state(d)
    ds = d / DS_DIR / state.tag
    missing = [str(p.relative_to(d)) for p in (d / CONFIG_FILE, d / WEIGHTS_NAME, ds) if not p.exists()]
    if ds.is_dir():
        missing += [f"{DS_DIR}/{state.tag}/{pattern}"
                    for pattern in checkpoint_file_patterns(state.zero_stage, state.world_size)
                    if not any(ds.glob(pattern))]
    if missing:
        raise ValueError(f"checkpoint {str(d)!r} is incomplete: missing {missing}")
    return state


def load(ckpt_dir: str | os.PathLike, *, engine: Any, cfg: Config) -> TrainerState:
    """Restore engine state (module, optimizer) and RNG of this rank from a checkpoint."""
    d = Path(ckpt_dir)
    state = validate(d)
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if state.zero_stage != cfg.deepspeed.zero_stage or (state.zero_stage >= 1 and state.world_size != world_size):
        raise ValueError(
            f"checkpoint {str(d)!r} was written with deepspeed.zero_stage={state.zero_stage} on "
            f"{state.world_size} workers; this run has deepspeed.zero_stage={cfg.deepspeed.zero_stage} on "
            f"{world_size}. Resume with the same settings, or start a new run from its weights "
            f"(train.init_from={str(d)!r})"
        )
    load_path, _ = engine.load_checkpoint(
        str(d / DS_DIR), tag=state.tag, load_optimizer_states=True, load_lr_scheduler_states=False,
    )
    if load_path is None:
        raise ValueError(f"checkpoint {str(d)!r}: DeepSpeed could not load {DS_DIR}/{state.tag}")
    rng_file = d / RNG_DIR / f"rank_{rank}.pt"
    if rng_file.is_file() and state.world_size == world_size:
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def latest_complete(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory under a local run folder (None if none)."""
    d = Path(run_dir)
    if not d.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := CHECKPOINT_DIR_RE.match(p.name))
    )
    for _, p in reversed(found):
        try:
            validate(p)
        except ValueError:
            continue
        return p
    return None
