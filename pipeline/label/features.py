"""What the labelling job clusters: each frame's features, from MFCC or a layer of a model.

Every extractor maps one whole utterance (float32 samples at 16 kHz) to (T, C) float32
features, one frame every ``stride`` samples whose ``window`` lies in the utterance:
frame f starts at sample ``f * stride``, so the label files say where each label sits and
``pipeline.data.labels`` can line them up with cropped audio.

- :class:`MfccFeatures`: Kaldi's MFCC + deltas (10 ms frames, 25 ms window).
- :class:`TeacherFeatures`: hidden state ``layer`` of a wavray model or a Hugging Face
  directory (the frames of its front end: 20 ms for the conv feature encoder). Long
  utterances go through in chunks of about ``max_chunk_seconds`` (fairseq's labelling does
  the same); each chunk also sees the samples its last frame's window needs, so no frame is
  lost at a boundary, and the Transformer's context is the chunk.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pipeline.label.mfcc import Mfcc


class MfccFeatures:
    """(S,) samples -> (T, 39) MFCC + deltas (``pipeline.label.mfcc``)."""

    kind = "mfcc"

    def __init__(self, device: str = "cpu") -> None:
        self._mfcc = Mfcc(device)
        self.stride = self._mfcc.stride
        self.window = self._mfcc.window
        self.dim = self._mfcc.dim

    def describe(self) -> dict[str, Any]:
        """What decides these features (part of the label version)."""
        return {"kind": "mfcc", "recipe": "kaldi-mfcc13-use_energy=false+deltas+ddeltas", "stride": self.stride,
                "window": self.window}

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        return self._mfcc(torch.from_numpy(np.asarray(audio, dtype=np.float32))).cpu().numpy()


def receptive_field(frontend: torch.nn.Module) -> tuple[int, int]:
    """(stride, window) in samples of a front end: the conv feature encoder or log-mel frames."""
    if hasattr(frontend, "kernels"):  # models.feature_encoder.FeatureEncoder
        window, jump = 1, 1
        for k, s in zip(frontend.kernels, frontend.strides, strict=True):
            window += (k - 1) * jump
            jump *= s
        return jump, window
    hop, stack, win = int(frontend.hop_length), int(frontend.stack), int(frontend.win_length)  # LogMelFrontend
    return hop * stack, win + (stack - 1) * hop


class TeacherFeatures:
    """(S,) samples -> (T, D) hidden state ``layer`` of ``model`` (module doc)."""

    kind = "model"

    def __init__(self, model: torch.nn.Module, layer: int, *, normalize: bool, max_chunk_seconds: float,
                 device: str = "cpu", sample_rate: int = 16000) -> None:
        from pipeline.probe import _encoder_of, num_hidden_states

        encoder = _encoder_of(model)
        if not hasattr(encoder, "transformer"):
            raise ValueError("label.teacher: expected a wav2vec 2.0-family model (a Transformer or Conformer encoder)")
        total = num_hidden_states(model)
        if not 0 <= layer < total:
            raise ValueError(
                f"label.layer: {layer} is not a hidden state of the teacher, which has {total} "
                f"(0: the Transformer's input, 1..{total - 1}: the layers' outputs)"
            )
        self.model = model.to(device).eval()
        self.layer = layer
        self.normalize = normalize
        self.device = torch.device(device)
        self.frontend = encoder.feature_encoder
        self.stride, self.window = receptive_field(self.frontend)
        self.dim = int(encoder.dim)
        frames = max(1, int(max_chunk_seconds * sample_rate) // self.stride)
        self.chunk = frames * self.stride
        """Samples whose frames one forward gives (a whole number of frames)."""

    def describe(self) -> dict[str, Any]:
        return {"kind": "model", "layer": self.layer, "normalize": self.normalize, "stride": self.stride,
                "window": self.window, "chunk": self.chunk}

    def frames(self, num_samples: int) -> int:
        return int(self.frontend.output_lengths(torch.tensor(num_samples)).item())

    @torch.no_grad()
    def __call__(self, audio: np.ndarray) -> np.ndarray:
        from pipeline.probe import hidden_states

        x = np.asarray(audio, dtype=np.float32)
        if self.normalize:  # the teacher's pretraining input (data.normalize)
            x = (x - x.mean()) / math.sqrt(float(x.var()) + 1e-5)
        need = self.frames(len(x))
        pieces = [torch.zeros(0, self.dim)]
        got = start = 0
        while got < need:
            # This chunk's frames and the samples its last frame's window reaches into the next.
            piece = torch.from_numpy(x[start:start + self.chunk + self.window - self.stride]).to(self.device)
            states, _ = hidden_states(self.model, piece.unsqueeze(0), None)
            take = min(self.chunk // self.stride, need - got)
            pieces.append(states[self.layer][0, :take].float().cpu())
            got += take
            start += self.chunk
        out = torch.cat(pieces, dim=0)
        if out.shape[0] != need:
            raise AssertionError(f"teacher features: {out.shape[0]} frames for {len(x)} samples, expected {need}")
        return out.numpy()


def load_teacher(location: str, layer: int, *, max_chunk_seconds: float, device: str,
                 store: Any = None, tracking_uri: str = "") -> TeacherFeatures:
    """The teacher at ``location`` (any model location) with its input normalisation."""
    from pipeline.model_io import load_model

    trained = load_model(location, store=store, tracking_uri=tracking_uri)
    return TeacherFeatures(trained.model, layer, normalize=trained.normalize, max_chunk_seconds=max_chunk_seconds,
                           device=device)
