"""``model-step``: time forward+backward of our model and of transformers' on the same batch.

Both models get the same weights (converted), the same batch, the same masks and the
same distractors, in training mode, in one process; timings alternate between the two
so that load changes on a shared machine hit both alike. Reported: the median step
time, samples/s and audio-seconds/s of each, and the ratio ours/theirs. On CPU the
process CPU time per step is reported too: on a machine shared with other jobs it
measures the work done, where the wall clock also measures the neighbours (use
``--threads 1`` there, since idle intra-op threads spin and count as CPU time).

What differs by design: ours also computes fairseq's feature penalty and gradient
scaling (HF has neither; both are cheap). LayerDrop is off in both so that every step
does the same work.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from models import config as model_presets
from models.factory import build_pretraining_model, count_parameters
from models.hf import model_config_to_hf, pretraining_state_to_hf
from models.masking import compute_span_mask, sample_negatives

SAMPLE_RATE = 16000


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.bench model-step", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="base", choices=sorted(model_presets.PRESETS))
    p.add_argument("--batch", type=int, default=2, help="utterances per batch")
    p.add_argument("--seconds", type=float, default=4.0, help="length of each utterance")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast, fp32 weights")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per model")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--no-hf", action="store_true", help="time only our model")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.batch < 1 or args.seconds <= 0 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch, --repeats must be >= 1, --seconds > 0, --warmup >= 0")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("model-step: --device cuda requested but no CUDA device is visible")
    cfg = model_presets.PRESETS[args.preset]()
    cfg.transformer = dataclasses.replace(cfg.transformer, layerdrop=0.0)

    torch.manual_seed(0)
    ours = build_pretraining_model(cfg).to(device).train()
    models: dict[str, torch.nn.Module] = {"ours": ours}
    if not args.no_hf:
        try:
            import transformers  # noqa: PLC0415 - optional, only for the comparison
        except ImportError:
            raise SystemExit(
                "model-step: the comparison needs Hugging Face transformers (pip install 'wavray[bench]'); "
                "--no-hf measures our model alone"
            ) from None

        hf_cfg = transformers.Wav2Vec2Config.from_dict(model_config_to_hf(cfg))
        theirs = transformers.Wav2Vec2ForPreTraining(hf_cfg)
        theirs.load_state_dict(pretraining_state_to_hf(ours.state_dict()), strict=True)
        models["transformers"] = theirs.to(device).train()

    samples = int(args.seconds * SAMPLE_RATE)
    gen = torch.Generator(device=device).manual_seed(0)
    source = torch.randn(args.batch, samples, device=device, generator=gen)
    frames = int(ours.encoder.feature_encoder.output_lengths(torch.tensor(samples)))
    mask = compute_span_mask(
        (args.batch, frames), mask_prob=cfg.mask.prob, mask_length=cfg.mask.length,
        min_masks=cfg.mask.min_masks, generator=gen, device=device,
    )
    neg = sample_negatives(mask, cfg.loss.num_negatives, generator=gen)
    neg_hf = neg + (torch.arange(args.batch, device=device) * frames).view(-1, 1, 1)

    def autocast():
        if args.dtype == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(name: str) -> None:
        model = models[name]
        model.zero_grad(set_to_none=True)
        with autocast():
            if name == "ours":
                loss = model(source, mask_time_indices=mask, negative_indices=neg, generator=gen).loss_sum
            else:
                loss = model(source, mask_time_indices=mask, sampled_negative_indices=neg_hf).loss
        loss.backward()

    for name in models:
        for _ in range(args.warmup):
            step(name)
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu_times: dict[str, list[float]] = {name: [] for name in models}
    peak: dict[str, float] = {}
    for _ in range(args.repeats):
        for name in models:  # alternate, so load changes hit both
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step(name)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"model-step: preset={args.preset} ({count_parameters(ours) / 1e6:.1f}M params) batch={args.batch}x"
        f"{args.seconds:g}s ({frames} frames) device={where} dtype={args.dtype} "
        f"warmup={args.warmup} repeats={args.repeats}"
    )
    results: dict[str, dict[str, float]] = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        cpu = statistics.median(cpu_times[name])
        results[name] = {
            "median_s": med,
            "samples_per_s": args.batch / med,
            "audio_s_per_s": args.batch * args.seconds / med,
            "median_cpu_s": cpu,
            **({"peak_mem_gib": peak[name]} if name in peak else {}),
        }
        extra = f"  peak {peak[name]:.2f} GiB" if name in peak else f"  (CPU time {cpu * 1000:.1f} ms/step)"
        print(
            f"  {name:<13} median {med * 1000:9.1f} ms/step  {args.batch / med:8.2f} samples/s  "
            f"{args.batch * args.seconds / med:8.1f} audio-s/s{extra}"
        )
    if "transformers" in results:
        ratio = results["ours"]["samples_per_s"] / results["transformers"]["samples_per_s"]
        cpu_ratio = results["transformers"]["median_cpu_s"] / results["ours"]["median_cpu_s"]
        results["ratio_ours_over_theirs"] = {"samples_per_s": ratio, "samples_per_cpu_s": cpu_ratio}
        line = f"  ratio ours/theirs (samples/s): {ratio:.2f}"
        if device.type == "cpu":
            line += f"   by CPU time: {cpu_ratio:.2f}"
        print(line)
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2))
    return 0
