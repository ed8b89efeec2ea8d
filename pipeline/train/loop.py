"""The generic training loop: accumulation, global normalisation, finite checks, cadences.

The loop knows nothing about wav2vec 2.0: a :class:`TrainStep` turns a batch into a loss
*sum* and a *count* (masked frames for pretraining, target tokens for CTC) plus metric
sums, and the loop does the rest, on any number of ranks:

1. draw ``grad_accum`` micro-batches (the wait is timed: data-wait fraction);
2. ``prepare`` each one on the device (masks and distractors are drawn here, from a
   generator seeded by (seed, step, rank, micro-step)), so every count is known before
   any forward; one all-reduce gives the global count N of the update;
3. forward + backward each micro-batch with ``loss_sum * W / N``: DeepSpeed averages
   gradients over the W ranks, so the update's gradient is
   ``sum over ranks and micro-batches of grad(loss_sum) / N``: the same whether the
   frames came as (batch 8, accumulation 1) or (batch 4, accumulation 2);
4. a loss that is not finite on any rank sets the optimizer's ``found_inf`` flag (one
   small all-reduce), and the fused update is skipped on the device and counted;
   more than ``train.max_nonfinite_steps`` in a row stops the run
   (:class:`NonFiniteLossError`);
5. every ``train.log_every`` updates (and at checkpoints and the end) the metric sums are
   reduced across ranks with one all-reduce and one host sync, and handed to the hooks;
6. a task whose model has state the optimizer does not own (data2vec's EMA teacher)
   updates it in ``end_update(eng, step, skipped)`` right after the optimizer step,
   with the skip flag as a device tensor (the update must not look at it on the host);
7. on a multilingual dataset (``languages``: the split's languages, the same list on
   every rank) and a task that reports each utterance's loss (``row_losses``, then
   ``StepOutput.row_loss``: every pretraining objective reports its main part, CTC
   fine-tuning its loss), each language's loss sum and count are added per update (one
   ``index_add`` on the device) and logged as ``loss/lang/<code>`` (its loss per counted
   unit) and ``lang_share/<code>`` (its share of the counted units); a monolingual run
   does none of it. The task also names its loss parts
   (``row_part_names``: ``contrastive`` and ``mlm`` for w2v-BERT, those and ``ctc`` for
   JUST, one part, the main one, for the others) and returns each utterance's sum and
   count of every part (``StepOutput.row_parts``, detached); they are added the same way
   (one more ``index_add`` per micro-batch for all the parts together, no host sync) and
   logged as ``loss/<part>/lang/<code>``: the part's loss per unit *it* counts (characters
   for ``ctc``, masked frames, true pairs or values for the others) among that language's
   utterances, NaN where the language had none (a language without any transcribed
   utterance, for JUST's ``ctc``). The names of these metrics depend on the run's
   languages and the task's part names alone, never on a batch, so every rank reduces the
   same ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import Config
from pipeline.train import engine as E
from pipeline.train import seeding
from pipeline.train.metrics import (
    Alarm,
    AlarmState,
    Health,
    MetricWindow,
    check_health,
    language_metric_name,
    ratio,
)
from pipeline.train.schedule import lr_multiplier

log = logging.getLogger("wavray.train")

Batch = Mapping[str, np.ndarray]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates had a non-finite loss; the run must stop."""


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host batch array on the training device (pinned and asynchronous on CUDA), for
    the tasks' ``prepare``."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


@dataclass
class Prepared:
    """A micro-batch on the device, ready for ``TrainStep.forward``."""

    inputs: dict[str, Any]
    count: torch.Tensor
    """() units the loss is summed over (masked frames, target tokens), on the device."""
    num_samples: int
    """Audio samples in the micro-batch (not padding): the speed metrics' unit."""


@dataclass
class StepOutput:
    """What a task step returns for one micro-batch."""

    loss_sum: torch.Tensor
    """() the loss summed over the micro-batch's ``count`` units."""
    count: torch.Tensor
    """() the same count as ``Prepared.count``."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """0-dim *sums* (or per-micro-batch values to be averaged over ``num_micro``)."""
    row_loss: torch.Tensor | None = None
    """(B,) each utterance's loss summed over its counted units (detached), for the
    per-language losses; None when the batch carries no languages or the task has none."""
    row_count: torch.Tensor | None = None
    """(B,) each utterance's counted units (its share of ``count``)."""
    row_parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Loss part -> ((B,) each utterance's sum of that part (detached), (B,) the units the part
    counts in it), for ``loss/<part>/lang/<code>``; the parts are among the task's
    ``row_part_names`` (one a micro-batch leaves out adds nothing). Empty when the batch
    carries no languages."""


class TrainStep(Protocol):
    """A task: pretraining (:class:`pipeline.train.pretrain.PretrainStep`), CTC, ...

    Optional class attributes the loop reads on a multilingual run (module doc, point 7):
    ``row_losses`` (True: ``StepOutput.row_loss`` is given) and ``row_part_names`` (the
    loss parts of ``StepOutput.row_parts``, the same on every rank).
    """

    def prepare(self, batch: Batch, *, step: int, micro: int, rank: int, device: torch.device) -> Prepared:
        """Move a host batch to the device and draw its random inputs (no host sync)."""
        ...

    def begin_update(self, module: torch.nn.Module, step: int) -> None:
        """Per-update model state (e.g. the Gumbel temperature) before the first forward."""
        ...

    def forward(self, model: Callable[..., Any], prepared: Prepared, *, step: int) -> StepOutput:
        """Forward one micro-batch through ``model`` (the DeepSpeed engine)."""
        ...

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Turn the reduced sums of a log interval into logged values."""
        ...

    def health(self) -> Health | None:
        """What the health alarms watch (chance level, target collapse); None: nothing."""
        ...


class LoopHooks:
    """Callbacks of the loop; the defaults do nothing. All ranks call every hook."""

    def on_batch(self, batch: Batch) -> None:
        """A host batch was consumed (data position bookkeeping)."""

    def on_log(self, step: int, metrics: dict[str, float], alarms: list[Alarm]) -> None:
        """Reduced metrics of the last interval, after update ``step`` (1-based count);
        ``alarms``: the health alarms raised or cleared at this log (same key, a message)."""

    def on_gradients(self, step: int) -> None:
        """After the last backward of update ``step`` (0-based), before the optimizer step:
        gradients are reduced over ranks (and clipped when ZeRO is off; under ZeRO
        DeepSpeed clips inside its step). For inspection and tests."""

    def should_checkpoint(self, step: int) -> bool:
        return False

    def on_checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        """Save after update ``step``; called on every rank (collective)."""


@dataclass
class LoopResult:
    step: int
    """Updates done when the loop ended."""
    metrics: dict[str, float]
    """The last reduced metrics."""
    skipped_steps: int


class TrainLoop:
    """Runs updates ``start_step .. cfg.train.max_steps`` of a task step on a DeepSpeed engine."""

    def __init__(
        self,
        cfg: Config,
        eng: E.Engine,
        task: TrainStep,
        *,
        start_step: int = 0,
        hooks: LoopHooks | None = None,
        skipped_steps: int = 0,
        train_seconds: float = 0.0,
        languages: tuple[str, ...] = (),
    ) -> None:
        self.cfg = cfg
        self.eng = eng
        self.task = task
        self.step = start_step
        self.hooks = hooks or LoopHooks()
        self.rank, self.world_size = E.world()
        self.device = eng.device
        self.lr_at = lr_multiplier(cfg.schedule, cfg.train.max_steps, cfg.optim.lr)
        self.window = MetricWindow(self.device)
        self.alarm_state = AlarmState()
        self.skipped_steps = skipped_steps
        self._nonfinite_run = torch.zeros((), device=self.device)  # updates in a row, now
        self._nonfinite_max = torch.zeros((), device=self.device)  # longest run in the window
        self._data_wait = 0.0
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self.last_metrics: dict[str, float] = {}
        self._last_checkpoint = start_step
        self.train_seconds = train_seconds
        """Seconds of training so far by ``train.budget_clock``, resumes included."""
        clock = cfg.train.budget_clock
        if clock == "auto":
            clock = "wall" if self.device.type == "cuda" else "cpu"
        self._now = time.perf_counter if clock == "wall" else time.process_time
        self._clock: float | None = None
        self.languages = tuple(languages)
        """The dataset's languages (the same on every rank): per-language losses when two or more."""
        self._language_index = {lang: i for i, lang in enumerate(self.languages)}
        self._language_names = [language_metric_name(lang) for lang in self.languages]
        self._languages_key = ""
        if len(self.languages) >= 2:
            from pipeline.data.loader import LANGUAGES  # Ray Data's side: only a multilingual run needs it

            self._languages_key = LANGUAGES
        self._part_names: tuple[str, ...] = ()
        """The task's loss parts logged per language (none on a monolingual run)."""
        if self._languages_key:
            self._part_names = tuple(getattr(task, "row_part_names", ()))
            if len(set(self._part_names)) != len(self._part_names):
                raise ValueError(f"row_part_names: each part once, got {list(self._part_names)}")

    def _language_codes(self, batch: Batch) -> torch.Tensor | None:
        """(B,) index of each utterance's language in ``self.languages``, on the device;
        None on a monolingual run or a batch without languages."""
        if not self._languages_key or self._languages_key not in batch:
            return None
        try:
            codes = [self._language_index[str(lang)] for lang in batch[self._languages_key]]
        except KeyError as e:
            raise ValueError(f"batch: language {e.args[0]!r} is not one of the dataset's {list(self.languages)}") from None
        return to_device(np.asarray(codes, dtype=np.int64), self.device)

    def _part_rows(self, parts: Mapping[str, tuple[torch.Tensor, torch.Tensor]], rows: int) -> torch.Tensor:
        """(2 P, B): each part's per-utterance sums and counts, in ``self._part_names``'
        order (zeros for a part the micro-batch left out), for one ``index_add_``."""
        unknown = set(parts) - set(self._part_names)
        if unknown:  # a part the loop would drop without a word: the task's names are wrong
            raise ValueError(f"StepOutput.row_parts: {sorted(unknown)} not among the task's row_part_names "
                             f"{list(self._part_names)}")
        out = []
        for name in self._part_names:
            if name in parts:
                loss, count = parts[name]
                out += [loss.detach().float(), count.detach().float()]
            else:
                out += [torch.zeros(rows, device=self.device)] * 2
        return torch.stack(out)

    # -- one update ------------------------------------------------------------------

    def _next_batches(self, batches: Iterator[Batch]) -> list[Batch] | None:
        """The micro-batches of one update; None when the stream ended (on every rank at
        once: the data is split equally)."""
        t0 = time.perf_counter()
        out = []
        for _ in range(self.cfg.train.grad_accum):
            try:
                batch = next(batches)
            except StopIteration:
                return None
            self.hooks.on_batch(batch)
            out.append(batch)
        self._data_wait += time.perf_counter() - t0
        return out

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def train_step(self, batches: Iterator[Batch]) -> bool:
        """One optimizer update (``grad_accum`` micro-batches) on every rank; False when
        the data ran out before the update could start."""
        cfg, eng, step = self.cfg, self.eng, self.step
        host_batches = self._next_batches(batches)
        if host_batches is None:
            return False
        seeding.seed_global_rng(cfg.train.seed, step, self.rank)
        prepared = [
            self.task.prepare(b, step=step, micro=m, rank=self.rank, device=self.device)
            for m, b in enumerate(host_batches)
        ]
        codes = [self._language_codes(b) for b in host_batches]
        local_count = torch.stack([p.count.float() for p in prepared]).sum()
        global_count = self._all_reduce(local_count.clone())
        # DeepSpeed divides the summed gradients by W; scale so the result is sum / N.
        scale = self.world_size / torch.clamp(global_count, min=1.0)
        self.task.begin_update(eng.module, step)
        eng.optimizer.set_lr(cfg.optim.lr * self.lr_at(step))

        loss_total = torch.zeros((), device=self.device)
        num_samples = 0
        step_metrics: dict[str, torch.Tensor] = {}
        # (2, L) loss sums and counts by language. Whether a run has them depends only on the
        # dataset and the task, never on a batch, so every rank reduces the same metric names.
        by_language = None
        if self._languages_key and getattr(self.task, "row_losses", False):
            by_language = torch.zeros((2, len(self.languages)), device=self.device)
        # (2 P, L): the same for each of the task's loss parts (sums, counts interleaved).
        by_part = None
        if self._part_names:
            by_part = torch.zeros((2 * len(self._part_names), len(self.languages)), device=self.device)
        last = len(prepared) - 1
        for m, p in enumerate(prepared):
            with eng.autocast_context():
                out = self.task.forward(eng.engine, p, step=step)
            loss = out.loss_sum.float() * scale
            eng.engine.backward(loss, scale_wrt_gas=False)
            loss_total = loss_total + out.loss_sum.detach().float()
            num_samples += p.num_samples
            for k, v in out.metrics.items():
                step_metrics[k] = step_metrics[k] + v if k in step_metrics else v
            if by_language is not None and codes[m] is not None and out.row_loss is not None \
                    and out.row_count is not None:
                rows = torch.stack([out.row_loss.detach().float(), out.row_count.detach().float()])  # (2, B)
                by_language.index_add_(1, codes[m], rows)
            if by_part is not None and codes[m] is not None and out.row_parts:
                by_part.index_add_(1, codes[m], self._part_rows(out.row_parts, codes[m].shape[0]))
            if m == last:
                measured = E.clip_and_measure(eng)
                bad = (~torch.isfinite(loss_total)).float()
                bad = torch.clamp(self._all_reduce(bad), max=1.0)
                if measured is not None:  # grads are global already: every rank agrees
                    bad = torch.maximum(bad, (~torch.isfinite(measured)).float())
                eng.optimizer.found_inf = bad
                self.hooks.on_gradients(step)
            eng.engine.step()
        end_update = getattr(self.task, "end_update", None)
        if end_update is not None:
            end_update(eng, step, bad)

        norm = E.grad_norm(eng, measured)
        good = 1.0 - bad
        self._nonfinite_run = (self._nonfinite_run + 1.0) * bad
        self._nonfinite_max = torch.maximum(self._nonfinite_max, self._nonfinite_run)
        skip = bad > 0

        def kept(v: torch.Tensor) -> torch.Tensor:  # a skipped update contributes nothing (NaN * 0 is NaN)
            v = v.detach().float()
            return torch.where(skip, torch.zeros_like(v), v)

        if by_language is not None:
            for i, name in enumerate(self._language_names):
                step_metrics[f"lang/{name}/loss_sum"] = by_language[0, i]
                step_metrics[f"lang/{name}/count"] = by_language[1, i]
        if by_part is not None:
            for p, part in enumerate(self._part_names):
                for i, name in enumerate(self._language_names):
                    step_metrics[f"langpart/{part}/{name}/loss_sum"] = by_part[2 * p, i]
                    step_metrics[f"langpart/{part}/{name}/count"] = by_part[2 * p + 1, i]

        self.window.add({
            **{k: kept(v) for k, v in step_metrics.items()},
            "num_micro": good * len(prepared),
            "loss_sum": kept(loss_total),
            "count": kept(local_count),
            "num_samples": float(num_samples),
            "num_updates": 1.0,
            "num_good": good,
            "skipped": bad,
            "grad_norm_sum": kept(torch.nan_to_num(norm, nan=0.0, posinf=0.0)),
        })
        self.step += 1
        self._window_steps += 1
        return True

    # -- reduction and cadences -------------------------------------------------------

    def flush(self) -> dict[str, float]:
        """Reduce the window across ranks (one all-reduce, one host sync) into log values."""
        self.window.add({
            "nonfinite_max": self._nonfinite_max, "nonfinite_now": self._nonfinite_run,
            "data_wait_s": self._data_wait,
        })
        self._nonfinite_max = torch.zeros((), device=self.device)
        sums, local = self.window.reduce()
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        W = self.world_size
        rate = float(self.cfg.data.sample_rate)
        num_updates = sums.get("num_updates", 0.0) / W
        skipped = round(sums.get("skipped", 0.0) / W)
        self.skipped_steps += skipped
        metrics = self.task.summarize(sums)
        counted = sum(sums.get(f"lang/{name}/count", 0.0) for name in self._language_names)
        for name in self._language_names:
            if f"lang/{name}/count" in sums:
                n = sums[f"lang/{name}/count"]
                metrics[f"loss/lang/{name}"] = ratio(sums[f"lang/{name}/loss_sum"], n)
                metrics[f"lang_share/{name}"] = ratio(n, counted)
        for part in self._part_names:
            for name in self._language_names:
                key = f"langpart/{part}/{name}"
                if f"{key}/count" in sums:
                    metrics[f"loss/{part}/lang/{name}"] = ratio(sums[f"{key}/loss_sum"], sums[f"{key}/count"])
        metrics.update({
            "loss": ratio(sums.get("loss_sum", 0.0), sums.get("count", 0.0)),
            "lr": self.cfg.optim.lr * self.lr_at(max(self.step - 1, 0)),
            "grad_norm": ratio(sums.get("grad_norm_sum", 0.0) / W, sums.get("num_good", 0.0) / W),
            "loss_scale": E.loss_scale(self.eng),
            "skipped_steps": float(self.skipped_steps),
            "nonfinite_in_row": sums.get("nonfinite_max", 0.0) / W,
            "nonfinite_now": sums.get("nonfinite_now", 0.0) / W,
            "speed/audio_s_per_s": sums.get("num_samples", 0.0) / rate / elapsed,
            "speed/audio_s_per_s_per_worker": local.get("num_samples", 0.0) / rate / elapsed,
            "speed/data_wait_frac": sums.get("data_wait_s", 0.0) / W / elapsed,
            "speed/step_time_s": elapsed / max(num_updates, 1.0),
            "train_seconds": self.train_seconds,
        })
        self._data_wait = 0.0
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self.last_metrics = metrics
        return metrics

    def _log(self, metrics: dict[str, float]) -> None:
        health = self.task.health()
        alarms = [] if health is None else check_health(
            metrics, step=self.step, warmup_steps=self.cfg.schedule.warmup_steps, health=health,
            chance_margin=self.cfg.train.chance_margin, min_perplexity=self.cfg.train.min_perplexity,
        )
        raised, cleared = self.alarm_state.update(alarms, self.step)
        if self.rank == 0:
            for a in raised:
                log.warning("HEALTH ALARM: %s", a.message)
            for a in cleared:
                log.warning("HEALTH ALARM %s %s", a.key, a.message)
        self.hooks.on_log(self.step, metrics, raised + cleared)
        limit = self.cfg.train.max_nonfinite_steps
        if metrics["nonfinite_in_row"] > limit:
            raise NonFiniteLossError(
                f"{int(metrics['nonfinite_in_row'])} consecutive updates had a non-finite loss "
                f"(train.max_nonfinite_steps = {limit}), the last at update {self.step}; stopping. "
                "Parameters were not changed by the skipped updates and the last checkpoint is intact: "
                "lower optim.lr, set optim.clip_grad_norm, or check the data for silent/corrupt audio."
            )

    def _tick(self) -> None:
        now = self._now()
        if self._clock is not None:
            self.train_seconds += now - self._clock
        self._clock = now

    def _out_of_time(self) -> bool:
        """Whether ``train.max_seconds`` is spent, agreed by every rank (the slowest decides)."""
        budget = self.cfg.train.max_seconds
        if budget <= 0:
            return False
        spent = torch.tensor(self.train_seconds, dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(spent, op=dist.ReduceOp.MAX)
        return float(spent) >= budget

    def run(self, batches: Iterator[Batch]) -> LoopResult:
        """Train until ``train.max_steps`` updates are done or ``train.max_seconds`` of training
        are spent (all ranks together)."""
        max_steps = self.cfg.train.max_steps
        self.eng.engine.train()
        self._window_start = time.perf_counter()
        self._clock = None
        self._tick()
        while self.step < max_steps:
            ran = self.train_step(batches)
            self._tick()
            if not ran:
                if self.rank == 0:
                    log.warning(
                        "the training data ended after update %d of train.max_steps = %d "
                        "(data.max_epochs = %d); finishing here", self.step, max_steps, self.cfg.data.max_epochs,
                    )
            out_of_time = ran and self._out_of_time()
            if out_of_time and self.rank == 0:
                log.info("train.max_seconds = %s spent after update %d; finishing here",
                         self.cfg.train.max_seconds, self.step)
            at_end = not ran or self.step == max_steps or out_of_time
            at_log = self.step % self.cfg.train.log_every == 0
            at_ckpt = self.hooks.should_checkpoint(self.step) or at_end
            if at_end and self.step == self._last_checkpoint:
                break  # the data ended right after a checkpoint: nothing new to save
            if at_log or at_ckpt:
                metrics = self.flush()
                self._log(metrics)
                if at_ckpt and metrics["nonfinite_now"] == 0:
                    self.hooks.on_checkpoint(self.step, metrics)
                    self._last_checkpoint = self.step
            self._tick()  # checkpoints are not training time
            if not ran or out_of_time:
                break
        return LoopResult(step=self.step, metrics=self.last_metrics, skipped_steps=self.skipped_steps)
