"""The DeepSpeed engine of a training worker, built from the typed config.

What this module decides, and why:

- The optimizer is a torch ``AdamW`` object handed to ``deepspeed.initialize``, never a
  name in the DeepSpeed config: DeepSpeed's own CPU Adam is a C++ op it compiles on first
  use (about 2 minutes on a small machine). fairseq's ``Adam`` applies weight decay
  decoupled from the gradient, which is what ``AdamW`` does.
- The optimizer is the fused ``AdamW`` with a ``found_inf`` flag (the hook torch's
  ``GradScaler`` uses): the loop sets the flag on the device when any rank's loss was not
  finite, and the fused kernel then leaves parameters, moments and step count untouched.
  A non-finite step is skipped without the host ever looking at the loss.
- The learning rate is written into the optimizer's param groups by the loop before each
  update (a pure function of the update number, :mod:`pipeline.train.schedule`), so the
  schedule cannot drift from the step when DeepSpeed skips an update on its own
  (ZeRO-1/2 do on a non-finite gradient norm), and the step is all a resume needs.
- Parameters stay fp32 inside DeepSpeed; on GPU the forward runs under bf16 autocast.
  DeepSpeed's engine turns off any autocast entered outside it unless its own
  ``torch_autocast`` section is on, so the bf16 setting goes into the DeepSpeed config
  (with no "lower-precision-safe" modules, so gradients are never reduced in bf16).
  Gradients, master weights and the all-reduce are fp32: the BASE model is small enough
  that this costs little, and the Gumbel quantizer and the losses keep full precision.
- ``train.compile`` compiles regions, not the whole model: the feature encoder and each
  Transformer layer (:func:`apply_regional_compile`). LayerDrop's per-update choice of
  layers, the mask and Gumbel generators and the temperature stay outside the compiled
  graphs, which would otherwise be recompiled for every update.
- Gradient clipping: DeepSpeed's ZeRO-1/2/3 compute the global norm anyway and clip with
  it; with ZeRO disabled DeepSpeed computes no norm, so the loop clips and measures it
  itself (:func:`clip_and_measure`).
- Activation checkpointing is the encoders' own (``checkpoint_activations``, torch's
  non-reentrant checkpoint around each layer); nothing is patched.
- DeepSpeed compiles a CPU shared-memory all-reduce op (``deepspeed_shm_comm``, about
  50 s) when its comm backend starts. Only its inference all-reduce uses that op;
  training collectives go through the torch process group (gloo on CPU). Unless
  ``deepspeed.cpu_shm_comm`` is set, the op is marked unavailable before DeepSpeed
  starts, so no worker ever compiles it. That and every other use of DeepSpeed beyond
  its documented API is in :mod:`pipeline.train.deepspeed_compat`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import Config
from pipeline.net import free_port
from pipeline.train.deepspeed_compat import skip_cpu_shm_comm_op

PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


class GuardedAdamW(torch.optim.AdamW):
    """Fused ``AdamW`` whose update is skipped on the device when ``found_inf`` is set.

    ``found_inf`` is a 0-dim float tensor (1.0 = skip) that the loop sets before every
    update; torch's fused kernels read it (the ``GradScaler`` protocol) and leave the
    parameters, moments and step count as they were. ZeRO-3 calls :meth:`step` once per
    parameter sub-group; every call sees the same flag.
    """

    def __init__(self, params: Any, *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        self.found_inf: torch.Tensor | None = None

    def set_lr(self, lr: float) -> None:
        """Write ``lr`` into every param group (the schedule lives in the loop)."""
        for group in self.param_groups:
            group["lr"] = lr


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Turn on every encoder's activation checkpointing; returns how many layers it covers.

    The state dict is untouched.
    """
    encoders = [m for m in model.modules() if hasattr(m, "checkpoint_activations")]
    if not encoders:
        raise ValueError("train.activation_checkpointing: the model has no encoder that supports it")
    for m in encoders:
        m.checkpoint_activations = True
    return sum(len(m.layers) for m in encoders)


def apply_regional_compile(model: torch.nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` the feature encoder and each Transformer layer in place.

    Returns how many regions were compiled; the state dict is untouched (``Module.compile``
    keeps parameter names). Shapes that change between buckets are marked dynamic by
    ``torch.compile`` after the first recompile.
    """
    encoder = getattr(model, "encoder", None)
    layers = getattr(getattr(encoder, "transformer", None), "layers", None)
    feature_encoder = getattr(encoder, "feature_encoder", None)
    if layers is None or feature_encoder is None:
        raise ValueError("train.compile: the model has no encoder.feature_encoder and encoder.transformer.layers")
    regions = [feature_encoder, *layers]
    for region in regions:
        region.compile(backend=backend)
    return len(regions)


def ensure_process_group(backend: str | None = None) -> None:
    """Start a one-process group on loopback when none exists (benchmarks, tests).

    Under Ray Train the group already exists (Ray creates it before the train function
    runs) and DeepSpeed reuses it.
    """
    if dist.is_available() and dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)


def world() -> tuple[int, int]:
    """(rank, world size) of the data-parallel group; (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def training_device() -> torch.device:
    """The device this worker trains on: its CUDA device when there is one, else CPU."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 for ``precision: bf16`` or ``auto`` on GPU; None (plain fp32) otherwise."""
    precision = cfg.train.precision
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda":
        return torch.bfloat16
    return None


def deepspeed_config(cfg: Config, world_size: int, autocast: torch.dtype | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` (no optimizer/scheduler entries: see module doc).

    ``autocast`` (the dtype of :func:`autocast_dtype`) turns on DeepSpeed's
    ``torch_autocast``: without it the engine's forward runs with autocast disabled.

    Batches are dicts of variable-size tensors the loop feeds itself, so DeepSpeed's
    ``train_micro_batch_size_per_gpu`` is a bookkeeping 1; what matters to DeepSpeed is
    ``gradient_accumulation_steps`` (when to reduce and step).
    """
    stage = cfg.deepspeed.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(
            contiguous_gradients=True,
            overlap_comm=torch.cuda.is_available(),
            reduce_bucket_size=cfg.deepspeed.bucket_size,
            allgather_bucket_size=cfg.deepspeed.bucket_size,
        )
        if cfg.deepspeed.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if stage == 3:
        zero.update(
            stage3_gather_16bit_weights_on_model_save=True,
            stage3_prefetch_bucket_size=cfg.deepspeed.bucket_size,
            stage3_param_persistence_threshold=cfg.deepspeed.zero3_persistence_threshold,
        )
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.grad_accum * world_size,
        # ZeRO disabled: the loop clips (DeepSpeed would not report the norm).
        "gradient_clipping": cfg.optim.clip_grad_norm if stage >= 1 else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if autocast is not None:
        out["torch_autocast"] = {
            "enabled": True,
            "dtype": str(autocast).removeprefix("torch."),
            "lower_precision_safe_modules": [],  # reduce every gradient in fp32
        }
    return out


@dataclass
class Engine:
    """What the loop needs from DeepSpeed, in one place."""

    engine: Any
    """The ``deepspeed.DeepSpeedEngine``."""
    optimizer: GuardedAdamW
    """The torch optimizer inside it (DeepSpeed may wrap it for ZeRO)."""
    device: torch.device
    autocast: torch.dtype | None
    zero_stage: int
    clip_grad_norm: float

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def autocast_context(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast when configured, else a no-op."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)


def build_engine(cfg: Config, model: torch.nn.Module) -> Engine:
    """Wrap ``model`` in a DeepSpeed engine configured by ``cfg`` (process group must exist
    or is started on loopback for a single process)."""
    if not cfg.deepspeed.cpu_shm_comm:
        skip_cpu_shm_comm_op()
    import deepspeed

    ensure_process_group()
    _, world_size = world()
    device = training_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = model.to(device)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.train.compile:
        apply_regional_compile(model)
    optimizer = GuardedAdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.optim.lr,
        betas=(cfg.optim.betas[0], cfg.optim.betas[1]),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    autocast = autocast_dtype(cfg, device)
    ds_engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size, autocast),
        dist_init_required=False,
    )
    return Engine(
        engine=ds_engine,
        optimizer=optimizer,
        device=device,
        autocast=autocast,
        zero_stage=cfg.deepspeed.zero_stage,
        clip_grad_norm=cfg.optim.clip_grad_norm,
    )


def _grads(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    for p in module.parameters():
        if p.grad is not None:
            yield p.grad


def clip_and_measure(eng: Engine) -> torch.Tensor | None:
    """With ZeRO disabled: the global gradient norm (device tensor), clipped in place.

    After DeepSpeed's all-reduce every rank holds the same full gradients, so the norm
    is already global. Returns None under ZeRO (DeepSpeed measures and clips there; read
    :func:`grad_norm` after the update).
    """
    if eng.zero_stage >= 1:
        return None
    grads = list(_grads(eng.module))
    if not grads:
        return torch.zeros((), device=eng.device)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)  # ()
    if eng.clip_grad_norm > 0:
        coef = torch.clamp(eng.clip_grad_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
    return norm


def grad_norm(eng: Engine, measured: torch.Tensor | None) -> torch.Tensor:
    """The last update's global gradient norm as a device tensor (NaN when unknown)."""
    if measured is not None:
        return measured.detach().float()
    value = eng.engine.get_global_grad_norm()
    if value is None:
        return torch.full((), float("nan"), device=eng.device)
    if torch.is_tensor(value):
        return value.detach().float().to(eng.device)
    return torch.tensor(float(value), device=eng.device)


def loss_scale(eng: Engine) -> float:
    """The loss scale in use: 1 (fp32 parameters, bf16 autocast needs no scaling)."""
    scale = getattr(eng.engine.optimizer, "loss_scale", None)
    try:
        return float(scale) if scale is not None else 1.0
    except (TypeError, ValueError):
        return 1.0
