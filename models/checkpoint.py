"""The weights file of a wavray model checkpoint: ``model.safetensors``.

A wavray model checkpoint is a directory holding ``config.yaml`` (the resolved run
config, written by ``pipeline.config.save_config``) and ``model.safetensors`` (the plain
state dict of ``Wav2Vec2ForPretraining`` or ``Wav2Vec2ForCTC``). This module reads and
writes the weights; the config belongs to ``pipeline``.

safetensors holds tensors only, so loading a file cannot run code.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.hf import read_hf_state_dict, split_hf_state

WEIGHTS_NAME = "model.safetensors"
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def clean_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip wrapper prefixes (``torch.compile``'s ``_orig_mod.``, DDP/DeepSpeed's ``module.``)."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value
    return out


def save_weights(model_or_state: nn.Module | dict[str, Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict as safetensors, atomically (a crash leaves the old file intact).

    ``path`` is the file, or a directory that receives ``model.safetensors``.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    state = {k: v.detach().cpu().contiguous() for k, v in clean_state_dict(state).items()}
    p = Path(path)
    if p.is_dir() or p.suffix != ".safetensors":
        p.mkdir(parents=True, exist_ok=True)
        p = p / WEIGHTS_NAME
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, p)
    return p


def weights_path(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a weights file, else ``path/model.safetensors``; errors name the path."""
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise ValueError(f"checkpoint {str(path)!r}: expected a directory with {WEIGHTS_NAME} or that file; not found")
    return p


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read ``model.safetensors`` (or the directory holding it) into a state dict."""
    p = weights_path(path)
    try:
        return load_file(str(p), device=str(device))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{p}: not a readable safetensors file: {e}") from None


def load_pretrained_into(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Initialise ``model`` from a wavray checkpoint or a Hugging Face directory.

    Continued pretraining from a public checkpoint and fine-tuning from our own both go
    through here. Encoder weights must all be present with matching shapes; heads the
    source lacks (the quantizer of a CTC model, the CTC head of a pretraining model)
    keep their initialisation. Returns the names of the parameters left as they were.
    """
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        enc, heads, ctc = split_hf_state(read_hf_state_dict(p))
        state = {**enc, **heads, **ctc}
    else:
        state = clean_state_dict(load_weights(p))
    expected = model.state_dict()
    usable = {k: v for k, v in state.items() if k in expected}
    for key, value in usable.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{path}: {key}: shape {tuple(value.shape)} does not match the model's {tuple(expected[key].shape)}"
            )
    missing_encoder = [k for k in expected if k.startswith("encoder.") and k not in usable]
    if missing_encoder:
        raise ValueError(f"{path}: encoder weights missing: {missing_encoder[:5]}{' ...' if len(missing_encoder) > 5 else ''}")
    left = sorted(k for k in expected if k not in usable)
    if left:
        warnings.warn(f"{path}: kept the initialisation of {left}", stacklevel=2)
    model.load_state_dict(usable, strict=False)
    return left
