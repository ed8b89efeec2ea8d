"""What the training input has delivered, so a resumed run continues the epoch exactly.

The training stream is a sequence of units, one per (epoch, shard); each unit's batches
have stable keys ``(epoch, shard, batch_index)`` (see :mod:`pipeline.data.loader`). A
worker records every batch it consumes (:meth:`DataPosition.update`); the trainer merges
the workers' states into one (:meth:`DataPosition.merge`) and saves it with each
checkpoint. On resume, ``build_train_dataset(position=...)`` leaves out finished units
at the source and the consumed batches of unfinished ones before decoding them: nothing
is skipped and nothing consumed is delivered again; batches that were decoded or
prefetched but not consumed at the checkpoint are simply produced again.

The state is a plain JSON-able dict::

    {"version": 1, "plan": "<dataset id>/<plan hash>", "num_shards": 12,
     "epochs_done": 2,                       # epochs [0, 2) fully consumed
     "done": {"2": [0, 5]},                  # finished shards of later epochs
     "partial": {"2/3": {"num_batches": 40, "seen": [0, 1, 7]}}}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

VERSION = 1

# Keys of the position metadata each training batch carries.
EPOCH = "epoch"
SHARD_INDEX = "shard"
BATCH_INDEX = "batch_index"
NUM_BATCHES = "num_batches"
NUM_SHARDS = "num_shards"
PLAN = "plan"


def _dataset_of(plan: str) -> str:
    """``<dataset version>/<split>`` of a plan id ``<version>/<split>/<batching hash>``."""
    return plan.rsplit("/", 1)[0]


class DataPosition:
    """The set of training batches consumed so far, compacted to finished units and epochs."""

    def __init__(self, state: Mapping[str, Any] | None = None) -> None:
        self.plan = ""
        self.num_shards = 0
        self.epochs_done = 0
        self._done: dict[int, set[int]] = {}
        self._partial: dict[tuple[int, int], tuple[int, set[int]]] = {}
        if state:
            self._load(state)

    # --- recording ------------------------------------------------------------------

    def update(self, batch: Mapping[str, Any]) -> None:
        """Record one consumed batch (a dict yielded by ``iter_train_batches``)."""
        plan = str(batch.get(PLAN, ""))
        if plan and self.plan and plan != self.plan:
            if _dataset_of(plan) != _dataset_of(self.plan):
                raise ValueError(
                    f"data position: batch from dataset/split {_dataset_of(plan)!r} but this position "
                    f"tracks {_dataset_of(self.plan)!r}"
                )
            # Resumed with other batching settings: the loader re-reads unfinished units
            # whole under the new plan, so their old batch keys no longer apply.
            self._partial.clear()
            self.plan = plan
        self.plan = self.plan or plan
        self.num_shards = max(self.num_shards, int(batch.get(NUM_SHARDS, 0)))
        self._add(int(batch[EPOCH]), int(batch[SHARD_INDEX]), int(batch[NUM_BATCHES]), [int(batch[BATCH_INDEX])])
        self._compact()

    def _add(self, epoch: int, shard: int, num_batches: int, seen: Iterable[int]) -> None:
        if epoch < self.epochs_done or shard in self._done.get(epoch, ()):
            return
        key = (epoch, shard)
        n, have = self._partial.get(key, (num_batches, set()))
        if n != num_batches:
            raise ValueError(
                f"data position: unit epoch {epoch} shard {shard} has {num_batches} batches in one "
                f"record and {n} in another (different data config?)"
            )
        have.update(seen)
        self._partial[key] = (n, have)

    def _compact(self) -> None:
        for key in [k for k, (n, seen) in self._partial.items() if len(seen) >= n]:
            del self._partial[key]
            self._done.setdefault(key[0], set()).add(key[1])
        while self.num_shards and len(self._done.get(self.epochs_done, ())) >= self.num_shards:
            del self._done[self.epochs_done]
            self.epochs_done += 1
        for e in [e for e in self._done if e < self.epochs_done]:
            del self._done[e]
        for key in [k for k in self._partial if k[0] < self.epochs_done]:
            del self._partial[key]

    # --- queries ----------------------------------------------------------------------

    def contains(self, epoch: int, shard: int, batch_index: int) -> bool:
        """Whether batch ``(epoch, shard, batch_index)`` was consumed."""
        if epoch < self.epochs_done or shard in self._done.get(epoch, ()):
            return True
        entry = self._partial.get((epoch, shard))
        return entry is not None and batch_index in entry[1]

    def touches(self, epoch: int) -> bool:
        """Whether anything of ``epoch`` was consumed."""
        return epoch < self.epochs_done or epoch in self._done or any(e == epoch for e, _ in self._partial)

    def unit_done(self, epoch: int, shard: int) -> bool:
        return epoch < self.epochs_done or shard in self._done.get(epoch, ())

    def seen_batches(self, epoch: int, shard: int) -> frozenset[int]:
        """Consumed batch indices of an unfinished unit."""
        entry = self._partial.get((epoch, shard))
        return frozenset(entry[1]) if entry else frozenset()

    @property
    def epoch(self) -> int:
        """The first epoch not fully consumed."""
        return self.epochs_done

    def __len__(self) -> int:
        """Units (epoch, shard) with at least one consumed batch that are not finished."""
        return len(self._partial)

    # --- (de)serialisation --------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "plan": self.plan,
            "num_shards": self.num_shards,
            "epochs_done": self.epochs_done,
            "done": {str(e): sorted(s) for e, s in sorted(self._done.items()) if s},
            "partial": {
                f"{e}/{s}": {"num_batches": n, "seen": sorted(seen)}
                for (e, s), (n, seen) in sorted(self._partial.items())
            },
        }

    def _load(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != VERSION:
            raise ValueError(f"data position: expected version {VERSION}, got {state.get('version')!r}")
        self.plan = str(state.get("plan", ""))
        self.num_shards = int(state.get("num_shards", 0))
        self.epochs_done = int(state.get("epochs_done", 0))
        for e, shards in dict(state.get("done", {})).items():
            self._done.setdefault(int(e), set()).update(int(s) for s in shards)
        for key, unit in dict(state.get("partial", {})).items():
            e, _, s = str(key).partition("/")
            self._add(int(e), int(s), int(unit["num_batches"]), (int(b) for b in unit["seen"]))
        self._compact()

    @staticmethod
    def merge(states: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
        """Union of the workers' states (what the trainer saves with a checkpoint)."""
        out = DataPosition()
        for state in states:
            if not state:
                continue
            other = DataPosition(state)
            if other.plan and out.plan and other.plan != out.plan:
                raise ValueError(f"data position: cannot merge plans {out.plan!r} and {other.plan!r}")
            out.plan = out.plan or other.plan
            out.num_shards = max(out.num_shards, other.num_shards)
            # Epochs one worker saw finish are finished for all (the union is a set).
            out.epochs_done = max(out.epochs_done, other.epochs_done)
            for e, shards in other._done.items():
                out._done.setdefault(e, set()).update(shards)
            for (e, s), (n, seen) in other._partial.items():
                out._add(e, s, n, seen)
            out._compact()
        out._compact()
        return out.state_dict()
