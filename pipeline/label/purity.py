"""How good are the labels? Cluster usage, and purity against transcripts without phones.

HuBERT's paper judges k-means targets by their purity against forced phone alignments
(cluster purity, phone purity, PNMI). A prepared corpus has transcripts but no alignment
and no lexicon, so these measures use characters and a uniform alignment instead: the
normalised transcript's characters (``|`` between words) spread evenly over the
utterance's label frames. That alignment is crude (silences and slow phones smear it),
so the numbers are lower than phone purities would be, but they rank label sets made
from the same data: better features give purer clusters.

- ``cluster_purity``: frames whose cluster's most frequent character is theirs (how well
  a cluster predicts the character);
- ``character_purity``: frames whose character's most frequent cluster is theirs;
- ``pnmi``: I(character; cluster) / H(character), the share of the characters' entropy
  the clusters explain (0: independent, 1: the cluster says the character);
- ``majority_character``: the share of the most frequent character, the cluster purity of
  labels that say nothing.

Usage: per cluster frame counts, the clusters used, the perplexity of the label
distribution and the largest cluster's share (a few clusters taking most frames means
K-means collapsed onto silence or the features carry little).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.text import Vocabulary

VOCAB = Vocabulary.from_characters()


def character_targets(transcript: str | None, num_frames: int) -> np.ndarray | None:
    """(T,) character ids of the uniform alignment; None without a usable transcript."""
    if not transcript or num_frames <= 0:
        return None
    ids = VOCAB.encode(transcript)
    if not ids:
        return None
    where = (np.arange(num_frames) * len(ids)) // num_frames  # (T,) evenly spread
    return np.asarray(ids, dtype=np.int64)[where]


class LabelStats:
    """Cluster counts and the cluster x character co-occurrence of some utterances."""

    def __init__(self, clusters: int) -> None:
        self.clusters = clusters
        self.counts = np.zeros(clusters, dtype=np.int64)
        self.cooc = np.zeros((clusters, len(VOCAB)), dtype=np.int64)
        self.utterances = 0
        self.frames = 0
        self.transcribed_frames = 0

    def add(self, labels: np.ndarray, transcript: str | None) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        self.utterances += 1
        self.frames += len(labels)
        self.counts += np.bincount(labels, minlength=self.clusters)
        chars = character_targets(transcript, len(labels))
        if chars is not None:
            np.add.at(self.cooc, (labels, chars), 1)
            self.transcribed_frames += len(labels)

    def merge(self, other: LabelStats) -> None:
        self.counts += other.counts
        self.cooc += other.cooc
        self.utterances += other.utterances
        self.frames += other.frames
        self.transcribed_frames += other.transcribed_frames

    def to_json(self) -> dict[str, Any]:
        nz = np.nonzero(self.cooc)
        return {
            "clusters": self.clusters, "counts": self.counts.tolist(), "utterances": self.utterances,
            "frames": self.frames, "transcribed_frames": self.transcribed_frames,
            "cooc": [nz[0].tolist(), nz[1].tolist(), self.cooc[nz].tolist()],  # sparse: row, column, count
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabelStats:
        out = cls(int(data["clusters"]))
        out.counts = np.asarray(data["counts"], dtype=np.int64)
        rows, cols, vals = data["cooc"]
        out.cooc[np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)] = np.asarray(vals, dtype=np.int64)
        out.utterances, out.frames = int(data["utterances"]), int(data["frames"])
        out.transcribed_frames = int(data["transcribed_frames"])
        return out

    def usage(self) -> dict[str, Any]:
        """Cluster usage (module doc)."""
        total = self.counts.sum()
        p = self.counts / max(total, 1)
        nz = p[p > 0]
        return {
            "frames": int(total), "clusters_used": int((self.counts > 0).sum()), "clusters": self.clusters,
            "perplexity": float(math.exp(-(nz * np.log(nz)).sum())) if len(nz) else 0.0,
            "largest_share": float(p.max()) if total else 0.0,
            "counts": self.counts.tolist(),
        }

    def purity(self) -> dict[str, Any] | None:
        """Purity against the transcripts (module doc); None when no utterance had one."""
        n = self.cooc.sum()
        if n == 0:
            return None
        joint = self.cooc / n  # (K, C)
        pk, pc = joint.sum(axis=1), joint.sum(axis=0)
        nz = joint > 0
        mi = float((joint[nz] * np.log(joint[nz] / (pk[:, None] * pc[None, :])[nz])).sum())
        hc = float(-(pc[pc > 0] * np.log(pc[pc > 0])).sum())
        return {
            "alignment": "uniform: the transcript's characters spread evenly over the frames (no phone alignment)",
            "frames": int(n),
            "cluster_purity": float(self.cooc.max(axis=1).sum() / n),
            "character_purity": float(self.cooc.max(axis=0).sum() / n),
            "pnmi": mi / hc if hc > 0 else 0.0,
            "majority_character": float(pc.max()),
        }
