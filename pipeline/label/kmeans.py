"""k-means for HuBERT's labels: fitted with scikit-learn on a sample, applied in torch.

Why scikit-learn's ``MiniBatchKMeans``: it is what fairseq's HuBERT recipe fits
(``simple_kmeans/learn_kmeans.py``; FAMILY.md section 1), so every setting of the recipe
maps one to one (k-means++ initialisation, ``n_init`` 20, batches of 10k frames,
``max_iter`` 100, ``max_no_improvement`` 100, ``tol`` 0, ``reassignment_ratio`` 0); it is
already installed wherever wavray is (MLflow depends on it) and ships CPU wheels for
every platform. The fit sees one sample (10% of the corpus, capped by
``label.max_sample_frames``), on the driver; for K in the hundreds and a few million frames
that takes minutes. faiss would fit faster at very large K or sample sizes, but its GPU
builds do not come from PyPI and the recipe's settings would not carry over.

The expensive part, assigning every frame of the corpus to its nearest centroid, needs no
library: it is a matrix product on each labelling worker (:func:`assign`), on its GPU when
it has one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class KMeansSettings:
    clusters: int
    batch_size: int
    n_init: int
    max_iter: int
    max_no_improvement: int
    seed: int


def fit(features: np.ndarray, settings: KMeansSettings) -> tuple[np.ndarray, float]:
    """(centroids (K, C) float32, inertia per frame) of ``features`` (N, C)."""
    from sklearn.cluster import MiniBatchKMeans

    n = len(features)
    if n < settings.clusters:
        raise ValueError(
            f"k-means: {n} sampled frames for {settings.clusters} clusters; raise label.sample_fraction or "
            "label.max_sample_frames, or lower model.hubert.clusters"
        )
    km = MiniBatchKMeans(
        n_clusters=settings.clusters, init="k-means++", max_iter=settings.max_iter,
        batch_size=settings.batch_size, tol=0.0, max_no_improvement=settings.max_no_improvement,
        n_init=settings.n_init, reassignment_ratio=0.0, random_state=settings.seed, compute_labels=False,
    )
    km.fit(features.astype(np.float32, copy=False))
    centroids = km.cluster_centers_.astype(np.float32)
    inertia = float(inertia_per_frame(features, centroids))
    return centroids, inertia


class Assigner:
    """Nearest centroid of each frame: ``argmin ||x - c||^2 = argmin (||c||^2 - 2 x.c)``."""

    def __init__(self, centroids: np.ndarray, device: str | torch.device = "cpu", chunk: int = 65536) -> None:
        self.device = torch.device(device)
        self.centroids = torch.from_numpy(np.asarray(centroids, dtype=np.float32)).to(self.device)  # (K, C)
        self.norms = self.centroids.square().sum(dim=1)  # (K,)
        self.chunk = chunk

    @torch.no_grad()
    def __call__(self, features: np.ndarray) -> np.ndarray:
        """(T, C) -> (T,) int16 cluster ids."""
        x = torch.from_numpy(np.asarray(features, dtype=np.float32))
        out = []
        for i in range(0, len(x), self.chunk):
            part = x[i:i + self.chunk].to(self.device)
            out.append((self.norms - 2.0 * part @ self.centroids.T).argmin(dim=1).cpu())
        ids = torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
        return ids.numpy().astype(np.int16)


def assign(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(T,) int16 nearest-centroid ids of ``features`` (T, C)."""
    return Assigner(centroids)(features)


def inertia_per_frame(features: np.ndarray, centroids: np.ndarray) -> float:
    """Mean squared distance of each frame to its nearest centroid."""
    ids = assign(features, centroids).astype(np.int64)
    diff = np.asarray(features, dtype=np.float64) - centroids[ids]
    return float((diff ** 2).sum(axis=1).mean()) if len(ids) else 0.0
