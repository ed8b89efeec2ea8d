"""Weights files: ``model.safetensors`` read and written one way, for every format.

A wavray model checkpoint is a directory holding ``config.yaml`` (the resolved run
config, written by ``pipeline.config.save_config``) and ``model.safetensors`` (the plain
state dict of a pretraining or CTC model); a Hugging Face directory holds
``config.json`` and a ``model.safetensors`` in Hugging Face's key names. This module
reads and writes the weights files of both (atomically), checks shapes, and loads a
state dict into a model; locations and configs belong to ``pipeline``
(``pipeline.model_io``).

safetensors holds tensors only, so loading a file cannot run code.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

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

    ``path`` is the file, or a directory that receives ``model.safetensors``. Tied parameters
    (vq_bert's LM head reads its input embedding) are written under each of their names, as
    the state dict lists them: safetensors refuses tensors that share memory, and loading
    puts the same values back into the one parameter.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    state = {k: v.detach().cpu().contiguous() for k, v in clean_state_dict(state).items()}
    seen: set[int] = set()
    for key, value in state.items():
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen and value.numel():
            state[key] = value.clone()
        seen.add(ptr)
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


def check_shapes(state: dict[str, Tensor], expected: dict[str, Tensor], where: str) -> None:
    """Every tensor of ``state`` that ``expected`` also names has the same shape; the error
    names the source, the key and both shapes."""
    for key, value in state.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{where}: {key}: shape {tuple(value.shape)} does not match the model's {tuple(expected[key].shape)}"
            )


def load_into(model: nn.Module, state: dict[str, Tensor], where: str) -> list[str]:
    """Initialise ``model`` from ``state`` (our key names): continued pretraining from a
    public checkpoint and fine-tuning from our own both end here.

    Encoder weights must all be present with matching shapes; heads the source lacks (the
    quantizer of a CTC model, the CTC head of a pretraining model, or of another
    vocabulary) keep their initialisation, and weights the model has no place for are ignored. Returns the names
    of the parameters left as they were.
    """
    state = clean_state_dict(state)
    expected = model.state_dict()
    usable = {k: v for k, v in state.items() if k in expected}
    # A CTC head of another vocabulary (JUST's, a fine-tuned model's), or another kind of head
    # (vq_bert's LM head shares the name ``head.bias``), is a head the model lacks: taken whole or not at all.
    head = [k for k in expected if k.startswith("head.")]
    if any(k not in usable or usable[k].shape != expected[k].shape for k in head):
        for k in head:
            usable.pop(k, None)
    check_shapes(usable, expected, where)
    missing_encoder = [k for k in expected if k.startswith("encoder.") and k not in usable]
    if missing_encoder:
        raise ValueError(f"{where}: encoder weights missing: {missing_encoder[:5]}{' ...' if len(missing_encoder) > 5 else ''}")
    left = sorted(k for k in expected if k not in usable)
    if left:
        warnings.warn(f"{where}: kept the initialisation of {left}", stacklevel=2)
    model.load_state_dict(usable, strict=False)
    return left


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The weights of a local model directory in our key names: a Hugging Face directory
    (``config.json``; converted) or a wavray checkpoint (``model.safetensors``)."""
    from models.hf import HF_CONFIG, read_hf_state_dict, split_hf_state  # hf writes through this module

    p = Path(path)
    if p.is_dir() and (p / HF_CONFIG).is_file():
        enc, heads, ctc = split_hf_state(read_hf_state_dict(p))
        return {**enc, **heads, **ctc}
    return clean_state_dict(load_weights(p))


def load_pretrained_into(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Initialise ``model`` from a local wavray checkpoint or Hugging Face directory
    (:func:`load_into`); returns the names of the parameters left as they were."""
    return load_into(model, read_state_dict(path), str(path))
