"""HuBERT's prediction head: cosine similarity to a learned embedding of every cluster.

HuBERT (FAMILY.md section 1; fairseq ``hubert.py``) predicts the k-means cluster id of
each masked frame. Its head projects the context network's output into ``final_dim``
(fairseq ``final_proj``, one projection per label set: ``untie_final_proj``) and scores
each of the K clusters by the cosine between that projection and the cluster's learned
embedding (``label_embs_concat``), divided by a temperature (0.1)::

    h (B, T, D) -> proj (B, T, G, F) -> unit length --+
                                                      +-> dot / temp -> logits (B, T, G, K)
    embeddings (G * K, F) ------------> unit length --+

fairseq scores the positive against every other cluster as negatives; the softmax over
all K logits is the same thing, and the cross-entropy of :class:`models.masked_prediction.
MaskedPredictionModel` takes it over masked frames only (``pred_nomask_weight`` 0).
Computing the cosines as a product of unit vectors keeps memory at B x T x K instead of
fairseq's B x T x K x F.

The head has no Hugging Face home (``HubertModel`` is the encoder alone), so an export
leaves it behind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CosineHead(nn.Module):
    """(B, T, D) context -> (B, T, G * K) cosine logits over ``codebooks`` label sets of
    ``num_classes`` clusters (module doc)."""

    def __init__(self, dim: int, final_dim: int, num_classes: int, *, codebooks: int = 1, logit_temp: float = 0.1):
        super().__init__()
        if min(dim, final_dim, num_classes, codebooks) < 1:
            raise ValueError(
                f"CosineHead: expected positive sizes, got dim={dim}, final_dim={final_dim}, "
                f"num_classes={num_classes}, codebooks={codebooks}"
            )
        if logit_temp <= 0:
            raise ValueError(f"CosineHead: logit_temp must be > 0, got {logit_temp}")
        self.codebooks = codebooks
        self.num_classes = num_classes
        self.final_dim = final_dim
        self.logit_temp = logit_temp
        self.proj = nn.Linear(dim, final_dim * codebooks)
        # fairseq draws the label embeddings from U(0, 1) (``label_embs_concat.data.uniform_()``).
        self.label_embeddings = nn.Parameter(torch.empty(codebooks * num_classes, final_dim).uniform_())

    def forward(self, hidden: Tensor) -> Tensor:
        batch, time, _ = hidden.shape
        proj = self.proj(hidden).float().view(batch, time, self.codebooks, self.final_dim)  # (B, T, G, F)
        proj = F.normalize(proj, dim=-1, eps=1e-8)
        emb = F.normalize(self.label_embeddings.float(), dim=-1, eps=1e-8)
        emb = emb.view(self.codebooks, self.num_classes, self.final_dim)  # (G, K, F)
        logits = torch.einsum("btgf,gkf->btgk", proj, emb) / self.logit_temp  # (B, T, G, K)
        return logits.reshape(batch, time, self.codebooks * self.num_classes)
