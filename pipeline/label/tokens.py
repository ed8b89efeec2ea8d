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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.data.batching import normalize

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
            x = normalize(x)
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
    """(T, G) codeword ids -> (T,) int64 index of each frame's tuple (mixed radix ``entries``:
    :func:`models.vq_bert.pair_index`)."""
    from models.vq_bert import pair_index as index

    return index(torch.from_numpy(np.asarray(ids, dtype=np.int64)), entries).numpy()


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
    """(T, G) codeword ids -> (T,) int16 token ids of a vocabulary (:func:`build_vocabulary`;
    the lookup is :func:`models.vq_bert.pair_ids`, the one a fine-tuned model runs)."""

    def __init__(self, pairs: np.ndarray, size: int, entries: int) -> None:
        if len(pairs) > size - 1:
            raise ValueError(f"token vocabulary: {len(pairs)} pairs for {size - 1} ids")
        self.size = size
        self.unknown = size - 1
        self.entries = entries
        self.pairs = np.asarray(pairs, dtype=np.int64)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        from models.vq_bert import pair_ids

        pairs = torch.from_numpy(pair_index(ids, self.entries))
        return pair_ids(pairs, torch.from_numpy(self.pairs), self.unknown).numpy().astype(np.int16)


@dataclass
class Tokeniser:
    """The tokeniser of a vq_bert run's label set, as a module (:func:`load_tokeniser`)."""

    module: Any
    """A :class:`models.vq_bert.VqTokeniser`: the vq-wav2vec model's front end and quantizer, the set's vocabulary."""
    normalize: bool
    """Whether the vq-wav2vec model reads audio normalised per utterance (its ``data.normalize``)."""
    model: Any
    """The model section that builds ``module`` (:func:`models.factory.build_vq_tokeniser`): the
    vq_bert run's, with the vq-wav2vec model's ``frontend``, ``encoder`` and ``vq_wav2vec``."""
    teacher: str
    """Where the vq-wav2vec model is (``label.teacher``, pinned)."""


TOKENISER_SECTIONS = ("frontend.", "encoder.", "vq_wav2vec.")
"""The model config sections of a vq-wav2vec model that say how it tokenises."""


def load_tokeniser(cfg: Any, *, store: Any = None, tracking_uri: str = "") -> Tokeniser:
    """The tokeniser of the label set the vq_bert run of ``cfg`` trains on: its vq-wav2vec model
    (``label.teacher``) and the set's ``vocabulary.npz``, found from the run config as the
    training found them. The probe (:func:`audio_model`) and fine-tuning read audio through it."""
    from models.factory import build_vq_tokeniser
    from pipeline.config import apply_overrides, to_flat_dict
    from pipeline.data import storage
    from pipeline.label.job import open_npz, resolve
    from pipeline.model_io import run_config

    r = resolve(cfg, store=store, tracking_uri=tracking_uri)
    uri = storage.join(r.plan.version_uri, VOCABULARY_FILE)
    if not storage.exists(uri, r.plan.store):
        raise ValueError(
            f"vq_bert: the token vocabulary of the label set it trained on is not at {uri} (label.teacher="
            f"{cfg.label.teacher}, data.train_uri={cfg.data.train_uri}): its features of audio need that tokeniser"
        )
    features = r.extractor  # the teacher resolve loaded, with its input normalisation
    teacher_cfg = run_config(r.plan.teacher, store=r.plan.store, tracking_uri=tracking_uri)
    if teacher_cfg is None:
        raise ValueError(f"label.teacher={r.plan.teacher}: a vq-wav2vec model without its run config")
    sections = {k: v for k, v in to_flat_dict(teacher_cfg.model).items() if k.startswith(TOKENISER_SECTIONS)}
    model_cfg = apply_overrides(cfg, {"model": {**to_flat_dict(cfg.model), **sections}}).model
    if model_cfg.vq_bert.stride != features.stride:
        raise ValueError(f"vq_bert: model.vq_bert.stride is {model_cfg.vq_bert.stride} samples, its tokeniser's "
                         f"frames are {features.stride}")
    module = build_vq_tokeniser(model_cfg)
    module.frontend.load_state_dict(features.frontend.state_dict())
    module.quantizer.load_state_dict(features.model.quantizer.state_dict())
    module.set_vocabulary(torch.from_numpy(np.load(open_npz(uri, r.plan.store))["pairs"]))
    return Tokeniser(module.eval(), bool(features.normalize), model_cfg, r.plan.teacher)


def audio_model(trained: Any, *, store: Any = None, tracking_uri: str = "") -> torch.nn.Module:
    """The model downstream heads read audio through: ``trained.model`` itself, except for a
    vq_bert model, whose BERT reads tokens: then its BERT behind the tokeniser that made the
    label set it trained on (:class:`models.vq_bert.TokenisedBert` on :func:`load_tokeniser`).

    ``trained``: a :class:`pipeline.model_io.TrainedModel`.
    """
    from models.vq_bert import TokenisedBert, VqBertModel

    model = trained.model
    if not isinstance(model, VqBertModel):
        return model
    if trained.config is None:
        raise ValueError(f"{trained.path}: a vq_bert model without its run config: its tokeniser cannot be found")
    tok = load_tokeniser(trained.config, store=store, tracking_uri=tracking_uri)
    if tok.module.vocab != model.encoder.vocab:
        raise ValueError(f"vq_bert: its label set has {tok.module.vocab} tokens, the model {model.encoder.vocab}")

    def tokenise(audio: np.ndarray) -> np.ndarray:
        if not len(audio):
            return np.zeros(0, np.int64)
        x = normalize(audio) if tok.normalize else np.asarray(audio, dtype=np.float32)
        return tok.module(torch.from_numpy(x).unsqueeze(0))[0][0].numpy()

    return TokenisedBert(model.encoder, tokenise).eval()
