"""The real training loop on synthetic batches: speed, step-time split, memory, MFU.

    python -m jobs.bench train-step --preset tiny
    python -m jobs.bench train-step --preset base --batch 2 --seconds 4 --steps 3
    python -m jobs.bench train-step --preset base --device cuda          # bf16, the preset's batch

Runs :class:`pipeline.train.loop.TrainLoop` with the pretraining step and the DeepSpeed
engine of the config (ZeRO stage, accumulation, precision as configured; ``a.b.c=value``
overrides apply) in one process, on batches of noise made before timing starts, so data
wait is the loop's own overhead. The split of the step into data wait / prepare (host to
device, masks and distractors) / forward / backward / optimizer needs a device sync at
each boundary, which the loop itself never does: the total is measured separately,
without those syncs, and is what audio-s/s uses.

Model FLOPs are counted once with ``torch.utils.flop_counter`` on a forward + backward
of one micro-batch; MFU divides the achieved FLOP/s by the device's dense bf16 peak
(``--peak-tflops`` to override; CPUs have no meaningful peak, so no MFU there).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0,
                    "B200": 2250.0}


def _peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def _defaults(preset: str, on_gpu: bool, cfg: Any) -> tuple[int, float]:
    """(utterances per batch, seconds each): the preset's budget on GPU, small on CPU."""
    sr = cfg.data.sample_rate
    crop = cfg.data.max_sample_size
    if on_gpu or preset == "tiny":
        return max(1, cfg.data.max_samples_per_batch // crop), crop / sr
    return 2, 4.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench train-step", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="tiny, base, large, large_lv60k")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=0, help="utterances per micro-batch (default: see doc)")
    parser.add_argument("--seconds", type=float, default=0.0, help="seconds per utterance (default: see doc)")
    parser.add_argument("--steps", type=int, default=10, help="timed updates")
    parser.add_argument("--warmup", type=int, default=3, help="untimed updates first")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: known GPUs)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    parser.add_argument("overrides", nargs="*", help="a.b.c=value config overrides")
    args = parser.parse_args(argv)

    import torch

    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif args.device == "auto" and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from models.factory import build_pretraining_model, count_parameters
    from pipeline.config import apply_overrides, preset_config
    from pipeline.train import engine as E
    from pipeline.train.loop import LoopHooks, TrainLoop
    from pipeline.train.pretrain import PretrainStep

    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    cfg = preset_config(args.preset)
    cfg = apply_overrides(cfg, [f"train.max_steps={args.warmup + args.steps + 1}", *args.overrides])
    batch, seconds = _defaults(args.preset, on_gpu, cfg)
    batch, seconds = args.batch or batch, args.seconds or seconds
    num_samples = int(seconds * cfg.data.sample_rate)

    E.ensure_process_group()
    torch.manual_seed(cfg.train.seed)
    model = build_pretraining_model(cfg.model)
    eng = E.build_engine(cfg, model)
    task = PretrainStep(cfg, model)
    device = eng.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    timers = {k: 0.0 for k in ("data wait", "prepare", "forward", "backward", "optimizer")}
    timing = [False]

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            if not timing[0]:
                return fn(*a, **k)
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync()
            timers[name] += time.perf_counter() - t0
            return out
        return wrapper

    rng = np.random.default_rng(0)
    pool = [{"source": rng.standard_normal((batch, num_samples)).astype(np.float32),
             "padding_mask": np.zeros((batch, num_samples), bool)} for _ in range(4)]

    class Batches:
        """The pool, forever; times each ``next`` (what the loop waits for)."""

        def __init__(self) -> None:
            self.it = itertools.cycle(pool)

        def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
            return self

        def __next__(self) -> dict[str, np.ndarray]:
            t0 = time.perf_counter()
            b = next(self.it)
            if timing[0]:
                timers["data wait"] += time.perf_counter() - t0
            return b

    stream = Batches()
    loop = TrainLoop(cfg, eng, task, hooks=LoopHooks())
    eng.engine.train()
    for _ in range(args.warmup):
        loop.train_step(stream)
    sync()

    # 1) the plain loop, no extra syncs: the speed figures.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loop.train_step(stream)
    sync()
    step_s = (time.perf_counter() - t0) / args.steps
    loop.flush()

    # 2) the same updates with a sync at every boundary: the split.
    task.prepare = timed("prepare", task.prepare)  # type: ignore[method-assign]
    task.forward = timed("forward", task.forward)  # type: ignore[method-assign]
    eng.engine.backward = timed("backward", eng.engine.backward)
    eng.engine.step = timed("optimizer", eng.engine.step)
    timing[0] = True
    split_steps = max(1, min(args.steps, 3))
    for _ in range(split_steps):
        loop.train_step(stream)
    timing[0] = False
    split = {k: v / split_steps for k, v in timers.items()}

    W = E.world()[1]
    audio_per_update = batch * seconds * cfg.train.grad_accum
    flops = _flops_per_update(cfg, batch, num_samples, device, eng.autocast)
    peak = args.peak_tflops or (_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    achieved = flops / step_s / 1e12
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(device) / 2**30
        mem_kind = "CUDA allocated"
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        mem_kind = "process RSS"
    report = {
        "preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "workers": W, "zero_stage": cfg.deepspeed.zero_stage,
        "precision": str(eng.autocast).replace("torch.", "") if eng.autocast else "fp32",
        "params_m": count_parameters(model) / 1e6, "batch": batch, "seconds": seconds,
        "grad_accum": cfg.train.grad_accum, "step_s": step_s, "audio_s_per_s": audio_per_update * W / step_s,
        "audio_s_per_s_per_worker": audio_per_update / step_s, "split_s": split,
        "peak_memory_gib": mem, "memory_kind": mem_kind, "tflop_per_update": flops / 1e12,
        "achieved_tflops": achieved, "mfu": achieved / peak if peak else None,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    total = sum(split.values()) or 1.0
    parts = " + ".join(f"{k} {v:.3f} ({100 * v / total:.0f}%)" for k, v in split.items())
    print(f"train-step: preset {args.preset} ({report['params_m']:.1f}M params) on {report['device']} "
          f"({report['threads']} threads), {W} worker(s), ZeRO-{cfg.deepspeed.zero_stage}, {report['precision']}")
    print(f"  batch {batch} x {seconds:.2f} s = {batch * seconds:.1f} s of audio, accumulation {cfg.train.grad_accum}, "
          f"{args.steps} timed updates after {args.warmup} warm-up")
    print(f"  audio-s/s: {report['audio_s_per_s']:.1f} ({report['audio_s_per_s_per_worker']:.1f} per worker); "
          f"update {step_s:.3f} s")
    print(f"  split (synced, {split_steps} updates): {parts}")
    print(f"  peak memory: {mem:.2f} GiB ({mem_kind})")
    mfu = f"MFU {100 * report['mfu']:.1f}% of {peak:.0f} TFLOP/s" if peak else "MFU: n/a (no known peak for this device)"
    print(f"  model FLOPs: {flops / 1e9:.1f} GFLOP/update, achieved {achieved * 1e3:.1f} GFLOP/s; {mfu}")
    return 0


def _flops_per_update(cfg: Any, batch: int, num_samples: int, device: Any, autocast: Any) -> float:
    """Forward + backward FLOPs of one update, counted on a plain copy of the model."""
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models.factory import build_pretraining_model

    model = build_pretraining_model(cfg.model).to(device).train()
    source = torch.randn(batch, num_samples, device=device)
    counter = FlopCounterMode(display=False)
    ctx = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with counter, ctx:
        out = model(source, generator=torch.Generator(device=device).manual_seed(0))
        out.loss_sum.backward()
    return float(counter.get_total_flops()) * cfg.train.grad_accum


if __name__ == "__main__":
    sys.exit(main())
