"""BEST-RQ: the frozen random-projection targets, the masked-prediction loss against a
hand-computed case, the log-mel front end it reads, and its encoder in Hugging Face format."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import config as M
from models.best_rq import RandomProjectionQuantizer
from models.factory import build_pretraining_model
from models.frontends import LogMelFrontend
from models.masked_prediction import MaskedPredictionModel, fit_frames


def test_targets_are_the_nearest_codeword_of_the_projected_frame() -> None:
    q = RandomProjectionQuantizer(4, codebooks=2, codebook_size=3, codebook_dim=2, seed=7)
    feats = torch.tensor([[[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5], [-3.0, 1.0, 0.0, 0.0]]])  # (1, 3, 4)
    ids = q(feats)
    assert ids.shape == (1, 3, 2) and ids.dtype == torch.long
    # By hand: project, normalise, the codeword with the largest cosine (codewords are unit vectors).
    proj, book = q.projection.numpy(), q.codebook.numpy()
    assert np.allclose(np.linalg.norm(book, axis=-1), 1.0, atol=1e-6)
    for t in range(3):
        for g in range(2):
            x = feats[0, t].numpy() @ proj[g]
            x = x / np.linalg.norm(x)
            assert ids[0, t, g].item() == int(np.argmax(book[g] @ x)), (t, g)


def test_the_quantizer_is_seeded_saved_and_never_trained() -> None:
    a = RandomProjectionQuantizer(8, codebooks=1, codebook_size=16, codebook_dim=4, seed=3)
    b = RandomProjectionQuantizer(8, codebooks=1, codebook_size=16, codebook_dim=4, seed=3)
    c = RandomProjectionQuantizer(8, codebooks=1, codebook_size=16, codebook_dim=4, seed=4)
    assert torch.equal(a.projection, b.projection) and not torch.equal(a.projection, c.projection)
    assert list(a.parameters()) == [] and set(a.state_dict()) == {"projection", "codebook"}
    x = torch.randn(2, 5, 8, requires_grad=True)
    assert not a(x).requires_grad


def _model(codebooks: int = 2, size: int = 5) -> MaskedPredictionModel:
    cfg = M.best_rq_laptop()
    cfg.best_rq.codebooks, cfg.best_rq.codebook_size = codebooks, size
    torch.manual_seed(0)
    return build_pretraining_model(cfg).eval()


def test_loss_is_cross_entropy_at_masked_frames_averaged_over_codebooks() -> None:
    model = _model()
    source = torch.randn(2, 16000)
    out0 = model(source, mask_time_indices=torch.zeros(2, 24, dtype=torch.bool))
    T = out0.logits.shape[1]
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, [1, 4, 5]] = True
    mask[1, [0, T - 1]] = True
    targets = torch.randint(0, 5, (2, T, 2), generator=torch.Generator().manual_seed(1))
    out = model(source, mask_time_indices=mask, target_ids=targets)
    logp = out.logits.log_softmax(-1)  # (B, T, G, V)
    by_hand, correct = 0.0, 0.0
    for b, t in mask.nonzero().tolist():
        by_hand += -sum(float(logp[b, t, g, targets[b, t, g]]) for g in range(2)) / 2
        correct += sum(float(out.logits[b, t, g].argmax() == targets[b, t, g]) for g in range(2)) / 2
    assert float(out.loss_sum) == pytest.approx(by_hand, rel=1e-5)
    assert float(out.num_correct) == pytest.approx(correct) and int(out.num_masked) == 5
    # Target usage over the masked frames only: codebook 0's ids there, by hand.
    ids = [int(targets[b, t, 0]) for b, t in mask.nonzero().tolist()]
    p = np.bincount(ids, minlength=5) / len(ids)
    assert float(out.target_perplexity[0]) == pytest.approx(math.exp(-sum(x * math.log(x) for x in p if x > 0)))
    # Gradients reach the encoder and the head, nothing reaches the quantizer.
    model.train()
    model(source, mask_time_indices=mask, target_ids=targets).loss_sum.backward()
    assert model.prediction_head.weight.grad is not None
    assert model.encoder.transformer.layers[0].ffn1.fc1.weight.grad.abs().sum() > 0


def test_targets_follow_the_audio_at_the_models_frame_rate() -> None:
    model = _model(codebooks=1, size=256)
    t = torch.arange(32000) / 16000
    tones = torch.stack([torch.sin(2 * math.pi * 300 * t), torch.sin(2 * math.pi * 3000 * t)])  # (2, S)
    out = model(tones)
    T = out.logits.shape[1]
    assert out.target_ids.shape == (2, T, 1)
    assert T == int(model.encoder.feature_encoder.output_lengths(torch.tensor(32000)))
    # Different sounds are different codewords: each tone's most frequent id is its own.
    common = [int(out.target_ids[b, :, 0].mode().values) for b in range(2)]
    assert common[0] != common[1]
    # The gain of a recording does not change its targets (log-mel normalised per utterance).
    noise = torch.randn(2, 32000)
    same = (model(noise * 10).target_ids == model(noise).target_ids).float().mean()
    assert same > 0.95


def test_a_conv_front_end_gets_targets_at_its_20_ms_frames() -> None:
    cfg = M.best_rq_laptop()
    cfg.frontend.kind = "conv"
    cfg.encoder = M.tiny().encoder
    model = build_pretraining_model(cfg).eval()
    for n in (16000, 16111, 16319, 24000):
        out = model(torch.randn(1, n))
        assert out.target_ids.shape[1] == out.logits.shape[1] == int(model.encoder.feature_encoder.output_lengths(torch.tensor(n)))
    with pytest.raises(ValueError, match="frame stride must be a multiple of 160"):
        bad = M.best_rq_laptop()
        bad.frontend.hop, bad.frontend.stack = 100, 3
        bad.__post_init__()


def test_fit_frames_cuts_or_repeats_the_last_frame() -> None:
    x = torch.arange(6.0).view(1, 3, 2)
    assert torch.equal(fit_frames(x, 2), x[:, :2])
    longer = fit_frames(x, 5)
    assert longer.shape == (1, 5, 2) and torch.equal(longer[:, 3], x[:, 2]) and torch.equal(longer[:, 4], x[:, 2])


def test_stacked_normalised_log_mel() -> None:
    plain = LogMelFrontend(40, hop_length=160)
    stacked = LogMelFrontend(40, hop_length=160, stack=4)
    x = torch.randn(2, 16000)
    frames = plain(x)  # (B, F, 40)
    out = stacked(x)  # (B, F // 4, 160): four frames side by side
    assert out.shape == (2, frames.shape[1] // 4, 160)
    assert torch.allclose(out[:, 1], frames[:, 4:8].reshape(2, 160))
    assert int(stacked.output_lengths(torch.tensor(16000))) == out.shape[1] and stacked.stride == 640
    norm = LogMelFrontend(40, hop_length=160, stack=4, normalize=True)
    y = norm(x)
    per_channel = y.view(2, -1, 4, 40).reshape(2, -1, 40)
    assert torch.allclose(per_channel.mean(1), torch.zeros(2, 40), atol=1e-4)
    # Padding moves no statistic of the valid frames.
    padded = torch.cat([x, torch.zeros(2, 8000)], dim=1)
    n = torch.tensor([16000, 16000])
    valid = int(norm.output_lengths(n[0]))
    assert torch.allclose(norm(padded, n)[:, :valid], y[:, :valid], atol=1e-4)


def test_best_rq_presets_build() -> None:
    for name in ("best_rq", "best_rq_laptop"):
        cfg = M.PRESETS[name]()
        model = build_pretraining_model(cfg)
        assert isinstance(model, MaskedPredictionModel)
        assert model.codebook_size == cfg.best_rq.codebook_size and cfg.frame_stride == 640
    assert M.best_rq().transformer.kind == "conformer" and M.best_rq().best_rq.codebook_size == 8192


def test_the_encoder_exports_to_hugging_face_where_the_front_end_maps(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from models.hf import save_hf_encoder

    cfg = M.best_rq_laptop()
    model = build_pretraining_model(cfg)
    encoder = {k[len("encoder."):]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    with pytest.raises(ValueError, match="no place for a log-mel front end"):
        save_hf_encoder(encoder, cfg, tmp_path / "logmel")

    cfg.frontend.kind = "conv"
    cfg.encoder = M.tiny().encoder
    torch.manual_seed(0)
    model = build_pretraining_model(cfg).eval()
    encoder = {k[len("encoder."):]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    save_hf_encoder(encoder, cfg, tmp_path / "hf")
    hf, info = transformers.Wav2Vec2ConformerModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = torch.randn(1, 16000)
    with torch.no_grad():
        ours = model(x, mask_time_indices=torch.zeros(1, 49, dtype=torch.bool)).last_hidden_state
        theirs = hf.eval()(x).last_hidden_state
    assert F.mse_loss(ours, theirs) < 1e-10
