"""vq-wav2vec's tokens: every frame's codeword ids, one token per frame (``label.features=tokens``).

The tokeniser (:class:`TokenFeatures`) is a vq-wav2vec model's quantizer on its front end
(:meth:`models.wav2vec1.Wav2VecModel.tokens`): G ids per 10 ms frame, each one of V
codewords. A frame's token is its whole tuple of ids: the pair index ``g0 * V + g1``
(mixed radix for other G).

One id per frame, remapped to a dense vocabulary, rather than G ids per frame: the BERT of
the second stage reads one token per frame (the paper's; fairseq writes each frame as the
string ``g0-g1`` and builds a dictionary of those strings), the label files, the join with
the batches and its checks stay those of HuBERT's labels (one int16 per frame), and a
pair index does not fit int16 (2 x 320 -> 102,400 pairs) although the pairs a model uses
do (the paper: about 13.5k for Gumbel, 23k for k-means). The vocabulary is built the way
k-means is fitted, on the job's sample (``label.sample_fraction``; the vq_bert presets
take every train utterance): its ``K - 1`` most frequent pairs get ids 0 .. K - 2 in order
of frequency, and id K - 1 (``TokenMap.unknown``) stands for every other pair (a dictionary's
``<unk>``: pairs of the validation split the sample never saw, and the rarest when more
than K - 1 pairs are used). It is saved as ``vocabulary.npz`` in the version folder, so
the set says which pair each id is and a rerun reuses it.

Utterances go through the tokeniser whole: wav2vec 1.0's front end normalises each
utterance over time (GroupNorm over all its frames), so pieces would tokenise differently.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

VOCABULARY_FILE = "vocabulary.npz"


class TokenFeatures:
    """(S,) samples -> (T, G) int64 codeword ids of the vq-wav2vec ``model`` (module doc)."""

    kind = "tokens"

    def __init__(self, model: torch.nn.Module, *, normalize: bool, device: str = "cpu") -> None:
        from pipeline.label.features import receptive_field

        quantizer = getattr(model, "quantizer", None)
        if quantizer is None or not hasattr(model, "tokens"):
            raise ValueError("label.teacher: label.features=tokens needs a vq-wav2vec model (model.objective=vq_wav2vec)")
        self.model = model.to(device).eval()
        self.normalize = normalize
        self.device = torch.device(device)
        self.frontend = model.encoder.feature_encoder
        self.stride, self.window = receptive_field(self.frontend)
        self.groups = int(quantizer.groups)
        self.entries = int(quantizer.entries)
        self.dim = self.groups

    def describe(self) -> dict[str, Any]:
        """What decides these tokens (part of the label version; the weights' digest is added there)."""
        return {"kind": "tokens", "normalize": self.normalize, "groups": self.groups, "entries": self.entries,
                "stride": self.stride, "window": self.window}

    @property
    def pairs(self) -> int:
        """Possible tuples of ids: V ** G."""
        return self.entries ** self.groups

    def frames(self, num_samples: int) -> int:
        return int(self.frontend.output_lengths(torch.tensor(num_samples)).item())

    @torch.no_grad()
    def __call__(self, audio: np.ndarray) -> np.ndarray:
        x = np.asarray(audio, dtype=np.float32)
        if self.normalize:  # the model's pretraining input (data.normalize)
            x = (x - x.mean()) / math.sqrt(float(x.var()) + 1e-5)
        need = self.frames(len(x))
        if need == 0:
            return np.zeros((0, self.groups), np.int64)
        ids, _ = self.model.tokens(torch.from_numpy(x).to(self.device).unsqueeze(0))
        out = ids[0].cpu().numpy().astype(np.int64)  # (T, G)
        if out.shape[0] != need or (out < 0).any():
            raise AssertionError(f"tokens: {out.shape[0]} frames for {len(x)} samples, expected {need}")
        return out

    def pair_index(self, ids: np.ndarray) -> np.ndarray:
        """(T, G) ids -> (T,) int64 ``sum_g ids[:, g] * V ** (G - 1 - g)``."""
        return pair_index(ids, self.entries)


def pair_index(ids: np.ndarray, entries: int) -> np.ndarray:
    """(T, G) codeword ids -> (T,) int64 index of each frame's tuple (mixed radix ``entries``)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.zeros(len(ids), dtype=np.int64)
    for g in range(ids.shape[1]):
        out = out * entries + ids[:, g]
    return out


def count_pairs(pairs: np.ndarray) -> dict[int, int]:
    """Frames per pair index."""
    values, counts = np.unique(np.asarray(pairs, dtype=np.int64), return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


def build_vocabulary(counts: dict[int, int], size: int) -> np.ndarray:
    """The ``size - 1`` most frequent pairs (ties: the smaller index first), most frequent
    first: id i is ``pairs[i]``; id ``size - 1`` is every other pair (module doc)."""
    order = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return np.asarray([p for p, _ in order[: size - 1]], dtype=np.int64)


class TokenMap:
    """(T, G) codeword ids -> (T,) int16 token ids of a vocabulary (:func:`build_vocabulary`)."""

    def __init__(self, pairs: np.ndarray, size: int, entries: int) -> None:
        if len(pairs) > size - 1:
            raise ValueError(f"token vocabulary: {len(pairs)} pairs for {size - 1} ids")
        self.size = size
        self.unknown = size - 1
        self.entries = entries
        order = np.argsort(pairs, kind="stable")
        self._sorted = np.asarray(pairs, dtype=np.int64)[order]
        self._ids = order.astype(np.int64)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        pairs = pair_index(ids, self.entries)
        where = np.searchsorted(self._sorted, pairs)
        where = np.minimum(where, max(len(self._sorted) - 1, 0))
        found = (self._sorted[where] == pairs) if len(self._sorted) else np.zeros(len(pairs), bool)
        out = np.where(found, self._ids[where] if len(self._ids) else 0, self.unknown)
        return out.astype(np.int16)


def audio_model(trained: Any, *, store: Any = None, tracking_uri: str = "") -> torch.nn.Module:
    """The model downstream heads read audio through: ``trained.model`` itself, except for a
    vq_bert model, whose BERT reads tokens: then its BERT behind the tokeniser that made the
    label set it trained on (:class:`models.vq_bert.TokenisedBert`: the vq-wav2vec model at
    ``label.teacher`` and the set's ``vocabulary.npz``, found from its run config as the
    training found them).

    ``trained``: a :class:`pipeline.model_io.TrainedModel`.
    """
    from models.vq_bert import TokenisedBert, VqBertModel

    model = trained.model
    if not isinstance(model, VqBertModel):
        return model
    if trained.config is None:
        raise ValueError(f"{trained.path}: a vq_bert model without its run config: its tokeniser cannot be found")
    from pipeline.data import storage
    from pipeline.label.job import open_npz, resolve

    cfg = trained.config
    r = resolve(cfg, store=store, tracking_uri=tracking_uri)
    uri = storage.join(r.plan.version_uri, VOCABULARY_FILE)
    if not storage.exists(uri, r.plan.store):
        raise ValueError(
            f"vq_bert: the token vocabulary of the label set it trained on is not at {uri} (label.teacher="
            f"{cfg.label.teacher}, data.train_uri={cfg.data.train_uri}): its features of audio need that tokeniser"
        )
    features = r.extractor  # the teacher resolve loaded, with its input normalisation
    to_ids = TokenMap(np.load(open_npz(uri, r.plan.store))["pairs"], r.plan.clusters, features.entries)
    if to_ids.size != model.encoder.vocab:
        raise ValueError(f"vq_bert: the label set at {uri} has {to_ids.size} tokens, the model {model.encoder.vocab}")

    def tokenise(audio: np.ndarray) -> np.ndarray:
        return to_ids(features(audio)).astype(np.int64) if len(audio) else np.zeros(0, np.int64)

    return TokenisedBert(model.encoder, tokenise).eval()
