"""The frozen-encoder probe: learns a trivially separable task, is deterministic, leaves the encoder alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import tiny
from models.factory import build_ctc_model, build_pretraining_model
from pipeline.config import ProbeConfig
from pipeline.features import LogMelFrontend
from pipeline.probe import LabelledSet, extract, hidden_states, num_hidden_states, run_probe
from pipeline.text import Vocabulary

# Each character is a 120 ms tone of its own frequency; words are separated by silence.
FREQS = {"a": 300.0, "b": 700.0, "c": 1200.0, "d": 2000.0, "e": 3200.0}
VOCAB = Vocabulary.from_characters("abcde")
RATE = 16000


def toy_set(n: int, seed: int) -> LabelledSet:
    rng = np.random.default_rng(seed)
    ids, audio, texts = [], [], []
    for i in range(n):
        words = ["".join(rng.choice(list(FREQS), size=int(rng.integers(1, 4)))) for _ in range(int(rng.integers(1, 3)))]
        parts = [np.zeros(RATE // 10)]
        for w in words:
            for ch in w:
                t = np.arange(int(0.12 * RATE)) / RATE
                parts += [0.3 * np.sin(2 * np.pi * FREQS[ch] * t), np.zeros(int(0.04 * RATE))]
            parts.append(np.zeros(int(0.12 * RATE)))
        x = np.concatenate(parts).astype(np.float32)
        x += 0.01 * rng.standard_normal(len(x)).astype(np.float32)
        ids.append(f"toy-{seed}-{i}")
        audio.append(x)
        texts.append(" ".join(words))
    return LabelledSet(ids=ids, audio=audio, transcripts=texts)


@pytest.fixture(scope="module")
def toy() -> tuple[LabelledSet, LabelledSet]:
    return toy_set(48, 0), toy_set(16, 1)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_cer_drops_on_a_separable_task_and_is_deterministic(toy) -> None:
    train, dev = toy
    cfg = ProbeConfig(head="conv", hidden=32, steps=60, batch_size=8, lr=3e-3, seed=3)
    frontend = LogMelFrontend(40)
    first = run_probe(frontend, train, dev, cfg, vocab=VOCAB)
    assert first["probe/cer_at_start"] > 0.9  # an untrained head transcribes nothing right
    assert first["probe/cer"] < 0.45, first
    assert first["probe/train_loss"] < 1.5
    again = run_probe(frontend, train, dev, cfg, vocab=VOCAB)
    timing = {"probe/seconds"}
    assert {k: v for k, v in first.items() if k not in timing} == {k: v for k, v in again.items() if k not in timing}
    other = run_probe(frontend, train, dev, ProbeConfig(head="conv", hidden=32, steps=60, batch_size=8, lr=3e-3,
                                                        seed=4), vocab=VOCAB)
    assert other["probe/train_loss"] != first["probe/train_loss"]


def test_weighted_layers_on_a_wav2vec2_encoder_leave_it_untouched(toy) -> None:
    train, dev = toy
    torch.manual_seed(0)
    model = build_pretraining_model(tiny())
    model.train()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    out = run_probe(model, train.select(range(16)), dev.select(range(8)),
                    ProbeConfig(head="linear", hidden=16, steps=5, batch_size=4), vocab=VOCAB)
    weights = [out[f"probe/layer_weight_{i}"] for i in range(3)]  # Transformer input + 2 layers
    assert sum(weights) == pytest.approx(1.0) and all(w > 0 for w in weights)
    assert np.isfinite(out["probe/cer"]) and np.isfinite(out["probe/dev_loss"])
    assert model.training, "the probe must restore the encoder's mode"
    assert torch.equal(torch.get_rng_state(), rng_before), "the probe must not consume the global RNG"
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="probe.layer"):
        run_probe(model, train, dev, ProbeConfig(weighted_sum=False, layer=3, steps=1), vocab=VOCAB)


def test_hidden_states_are_the_transformer_layers() -> None:
    torch.manual_seed(0)
    ctc = build_ctc_model(tiny(), vocab_size=7).eval()
    source = torch.randn(2, 8000)
    pad = torch.zeros(2, 8000, dtype=torch.bool)
    pad[1, 6000:] = True
    states, lengths = hidden_states(ctc, source, pad)
    assert num_hidden_states(ctc) == len(states) == 3
    with torch.no_grad():
        final = ctc.encoder.transformer(ctc.encoder.feature_projection(ctc.encoder.extract_features(source, pad)[0])[0],
                                        ctc.encoder.extract_features(source, pad)[1])
    assert torch.allclose(states[-1], final)
    assert lengths.tolist() == [24, ctc.encoder.feature_encoder.output_lengths(torch.tensor(6000)).item()]
    # Per-utterance extraction trims padding frames and stacks the selected states.
    data = LabelledSet(ids=["x", "y"], audio=[np.zeros(8000, np.float32), np.ones(6000, np.float32)],
                       transcripts=["a", "b"])
    feats = extract(ctc, data, layers=[0, -1])
    assert [tuple(f.shape) for f in feats] == [(2, 24, 64), (2, int(lengths[1]), 64)]


def test_take_minutes_is_seeded_and_bounded(toy) -> None:
    train, _ = toy
    half = train.minutes / 2
    a, b = train.take_minutes(half, seed=1), train.take_minutes(half, seed=1)
    assert a.ids == b.ids and 0 < a.minutes <= half
    assert train.take_minutes(half, seed=2).ids != a.ids


def test_pick_minutes_gives_every_language_a_turn() -> None:
    """``by_language``: with room for three utterances, three languages get one each, however
    the shuffle ordered them; without it, the shuffle decides (here: one language twice)."""
    from pipeline.probe import pick_minutes

    languages = ["en"] * 20 + ["de"] * 3 + ["fr"] * 3
    lengths = [100] * len(languages)
    for seed in range(5):
        turns = pick_minutes(lengths, languages, 300, seed=seed, by_language=True)
        assert sorted(languages[i] for i in turns) == ["de", "en", "fr"]
        assert turns == sorted(turns) and turns == pick_minutes(lengths, languages, 300, seed=seed, by_language=True)
    plain = [[languages[i] for i in pick_minutes(lengths, languages, 300, seed=s)] for s in range(5)]
    assert any(len(set(p)) < 3 for p in plain)
    assert len(pick_minutes([500, 50], ["en", "en"], 10)) == 1, "at least one, even over budget"
