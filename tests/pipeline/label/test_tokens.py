"""vq-wav2vec's tokens (``pipeline.label.tokens``): pair indices, the vocabulary of the most
frequent pairs and the unknown id for the rest."""

from __future__ import annotations

import numpy as np

from pipeline.label.tokens import TokenMap, build_vocabulary, count_pairs, pair_index


def test_pairs_vocabulary_and_unknown() -> None:
    ids = np.array([[0, 1], [2, 3], [0, 1], [3, 3], [0, 1], [2, 3]])  # pairs 1, 11, 1, 15, 1, 11 (V = 4)
    pairs = pair_index(ids, 4)
    assert pairs.tolist() == [1, 11, 1, 15, 1, 11]
    counts = count_pairs(pairs)
    assert counts == {1: 3, 11: 2, 15: 1}
    vocab = build_vocabulary(counts, 3)  # 2 pairs + unknown
    assert vocab.tolist() == [1, 11]
    tokens = TokenMap(vocab, 3, 4)(ids)
    assert tokens.dtype == np.int16 and tokens.tolist() == [0, 1, 0, 2, 0, 1]
    big = TokenMap(build_vocabulary(counts, 10), 10, 4)(np.array([[3, 3], [1, 1]]))
    assert big.tolist() == [2, 9]  # 15 is the third most frequent; 5 was never seen
