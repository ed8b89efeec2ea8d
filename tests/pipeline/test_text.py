"""Vocabulary, normalisation, greedy CTC decoding and error rates on hand-made cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.text import (
    BLANK,
    Vocabulary,
    ctc_collapse,
    error_rates,
    greedy_decode,
    transcript_characters,
    utterance_errors,
)

V = Vocabulary.from_characters("abcd'")  # <pad>=0 |=1 a=2 b=3 c=4 d=5 '=6


def test_vocabulary_layout_and_round_trip(tmp_path) -> None:
    assert V.tokens == (BLANK, "|", "a", "b", "c", "d", "'")
    assert V.encode("ab  cd") == [2, 3, 1, 4, 5]
    assert V.decode([2, 3, 1, 4, 5]) == "ab cd"
    assert V.decode([0, 2, 0, 1, 1, 3]) == "a b"  # blanks dropped, repeated boundaries one space
    V.save(tmp_path)
    assert Vocabulary.load(tmp_path) == V
    assert Vocabulary.load(tmp_path / "vocab.json").to_hf_vocab()["<pad>"] == 0
    assert len(Vocabulary.from_characters()) == 2 + 27


def test_normalisation() -> None:
    assert V.normalize("  AB, c\u2019d!\tDa ") == "ab c'd da"
    assert V.normalize("cäb-bad") == "cab bad"  # accent stripped, hyphen splits words
    assert V.normalize("xyz") == ""
    assert V.encode("Bad, CAB.") == [3, 2, 5, 1, 4, 2, 3]


def test_a_joint_vocabulary_of_several_languages_keeps_their_letters() -> None:
    """The characters of German, French and Spanish transcripts (capitals, NFD accents, a
    typographic apostrophe, punctuation) give one vocabulary in which every letter keeps its
    own token, so normalising a transcript loses nothing, where English's default strips
    the accents and breaks words at ß and œ."""
    texts = ["Die Straße, über Äpfel!", "la sœur d\u2019école a\u0300 midi", "el niño y la señora"]
    chars = transcript_characters(texts)
    assert chars == "".join(sorted(set(chars)))  # sorted, each once
    assert {"ß", "ü", "ä", "œ", "é", "à", "ñ", "'"} <= set(chars)
    assert not set(chars) & set(" ,!\u2019ÄA")  # word breaks, capitals and apostrophe variants normalised
    joint = Vocabulary.from_characters(chars)
    assert joint.normalize(texts[0]) == "die straße über äpfel"
    assert joint.normalize(texts[1]) == "la sœur d'école à midi"  # NFD a + grave is NFKC à
    assert joint.decode(joint.encode(texts[2])) == "el niño y la señora"
    english = Vocabulary.from_characters()
    assert english.normalize(texts[0]) == "die stra e uber apfel"
    assert english.normalize(texts[1]) == "la s ur d'ecole a midi"


def test_bad_vocabularies_are_refused() -> None:
    with pytest.raises(ValueError, match="whitespace"):
        Vocabulary.from_characters("ab c")
    with pytest.raises(ValueError, match="added by itself"):
        Vocabulary.from_characters("ab|")
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary(("<pad>", "|", "a", "a"))
    with pytest.raises(ValueError, match="word boundary"):
        Vocabulary(("<pad>", "a", "b"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        V.decode([42])


def test_a_hugging_face_hub_vocabulary(tmp_path) -> None:
    # The layout of facebook/wav2vec2-base-960h: specials first, "|" at 4, capitals.
    mapping = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "E": 5, "T": 6, "A": 7, "'": 8}
    (tmp_path / "vocab.json").write_text(json.dumps(mapping))
    (tmp_path / "config.json").write_text(json.dumps({"pad_token_id": 0}))
    hub = Vocabulary.load(tmp_path)
    assert hub.blank_id == 0 and hub.boundary_id == 4 and hub.characters == "ETA'"
    assert hub.normalize("eat tea!") == "EAT TEA"  # upper-case vocabulary: upper-case references
    assert hub.encode("a tea") == [7, 4, 6, 5, 7]
    assert hub.decode([1, 7, 0, 4, 3, 6, 2]) == "A T"  # specials never reach the text
    (tmp_path / "config.json").write_text(json.dumps({"pad_token_id": 3}))
    assert Vocabulary.load(tmp_path).blank_id == 3


def test_ctc_collapse_and_greedy_decoding() -> None:
    assert ctc_collapse([0, 2, 2, 0, 2, 3, 3, 1, 1, 0]) == [2, 2, 3, 1]
    assert ctc_collapse([]) == []
    assert ctc_collapse([0, 0, 0]) == []
    best = torch.tensor([[2, 2, 0, 3, 1, 4, 4, 4], [5, 0, 5, 5, 6, 6, 0, 0]])
    # The second utterance has 5 valid frames: the padding frames (6, 0, 0) are ignored.
    decoded = greedy_decode(best, torch.tensor([8, 5]))
    assert decoded == [[2, 3, 1, 4], [5, 5, 6]]
    assert [V.decode(d) for d in decoded] == ["ab c", "dd'"]
    assert greedy_decode(best.numpy()) == [[2, 3, 1, 4], [5, 5, 6]]
    with pytest.raises(ValueError, match="lengths"):
        greedy_decode(best, [3])


def test_error_rates_on_hand_made_cases() -> None:
    e = utterance_errors("abc d", "abd d")  # one substitution of 5 characters, 1 of 2 words
    assert (e.char_edits, e.num_chars, e.word_edits, e.num_words) == (1, 5, 1, 2)
    assert utterance_errors("abc", "abc").cer == 0.0
    assert utterance_errors("ab cd", "").cer == 1.0  # everything deleted
    ins = utterance_errors("ab", "xab")  # one insertion
    assert (ins.char_edits, ins.word_edits) == (1, 1)
    empty = utterance_errors("", "ab c")
    assert empty.char_edits == 4 and math.isnan(empty.cer)
    # Corpus rates weight by length: (1 + 0 + 3) edits / (5 + 3 + 3) characters.
    rates = error_rates(["abc d", "abc", "bcd"], ["abd d", "abc", ""])
    assert rates["cer"] == pytest.approx(4 / 11)
    assert rates["wer"] == pytest.approx((1 + 0 + 1) / 4)
    assert rates["num_utterances"] == 3
    with pytest.raises(ValueError, match="2 references but 1"):
        error_rates(["a", "b"], ["a"])


def test_decode_of_random_paths_matches_a_reference_loop() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        path = rng.integers(0, 4, size=int(rng.integers(0, 20)))
        expected, prev = [], None
        for t in path.tolist():
            if t != prev and t != 0:
                expected.append(t)
            prev = t
        assert ctc_collapse(path) == expected
