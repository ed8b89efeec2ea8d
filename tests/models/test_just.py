"""JUST's model: w2v-BERT's losses unchanged, a CTC head whose encoder and head are a CTC
model's (the same scores, the same state dict keys), and its config."""

from __future__ import annotations

import pytest
import torch

from models import config as M
from models.factory import build_ctc_model, build_pretraining_model
from models.just import JustModel
from models.masking import sample_negatives
from models.w2v_bert import W2vBertModel


def _config(vocab_size: int = 7) -> M.ModelConfig:
    cfg = M.just_laptop()
    cfg.just.vocab_size = vocab_size
    return cfg


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    source = torch.randn(2, 16000, generator=gen)
    pad = torch.zeros(2, 16000, dtype=torch.bool)
    pad[1, 9600:] = True  # 14 of the 24 log-mel frames are valid
    return source, pad


@torch.no_grad()
def test_the_self_supervised_part_is_w2v_bert_and_the_head_reads_the_last_block() -> None:
    cfg = _config()
    torch.manual_seed(0)
    model = build_pretraining_model(cfg).eval()
    assert isinstance(model, JustModel) and model.vocab_size == 7
    w2v_cfg = M.w2v_bert_laptop()
    w2v = build_pretraining_model(w2v_cfg).eval()
    assert isinstance(w2v, W2vBertModel)
    missing = w2v.load_state_dict(model.state_dict(), strict=False)
    assert not missing.missing_keys and set(missing.unexpected_keys) == {"head.weight", "head.bias"}

    source, pad = _batch()
    mask = torch.zeros(2, 24, dtype=torch.bool)
    mask[0, [2, 3, 10]] = True
    mask[1, [0, 7, 8]] = True
    negatives = sample_negatives(mask, 4, generator=torch.Generator().manual_seed(2))
    out = model(source, pad, mask_time_indices=mask, negative_indices=negatives)
    ref = w2v(source, pad, mask_time_indices=mask, negative_indices=negatives)
    assert torch.allclose(out.w2v_bert.loss_sum, ref.loss_sum) and torch.allclose(out.w2v_bert.mlm_sum, ref.mlm_sum)
    # The head reads the masked-LM module's output (the encoder's), padding's frames not counted.
    assert torch.allclose(out.ctc_logits, model.head(out.w2v_bert.last_hidden_state))
    assert out.ctc_logits.shape == (2, 24, 7) and out.output_lengths.tolist() == [24, 14]


@torch.no_grad()
def test_encoder_and_head_are_a_ctc_model() -> None:
    """``encoder.*`` and ``head.*`` load into the CTC model of the same config, which then gives
    the scores JUST gives an unmasked input (what ``jobs.evaluate`` relies on)."""
    cfg = _config()
    torch.manual_seed(0)
    model = build_pretraining_model(cfg).eval()
    ctc = build_ctc_model(cfg, model.vocab_size).eval()
    ctc.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(("encoder.", "head."))})
    source, pad = _batch()
    none = torch.zeros(2, 24, dtype=torch.bool)
    out = model(source, pad, mask_time_indices=none, negative_indices=torch.zeros(2, 24, 1, dtype=torch.long))
    ref = ctc(source, pad)
    valid = ~ref.padding_mask  # (B, T)
    assert torch.allclose(out.ctc_logits[valid], ref.logits[valid], atol=1e-5)
    assert torch.equal(out.output_lengths, ref.output_lengths)


def test_config() -> None:
    with pytest.raises(ValueError, match="vocab_size is 0"):
        build_pretraining_model(M.just_laptop())
    with pytest.raises(ValueError, match="ctc_weight"):
        M.JustConfig(ctc_weight=-1.0)
    bad = M.just_laptop()
    bad.transformer.kind = "transformer"
    with pytest.raises(ValueError, match="model.objective=just.*conformer"):
        M.ModelConfig(**{f: getattr(bad, f) for f in bad.__dataclass_fields__})
    assert M.just().w2v_bert_contrastive_layers == 8 and M.just().objective == "just"


def test_fine_tuning_from_just_takes_its_encoder_and_its_head_of_the_same_vocabulary() -> None:
    from models.checkpoint import load_into

    cfg = _config(vocab_size=7)
    torch.manual_seed(0)
    state = build_pretraining_model(cfg).state_dict()
    same = build_ctc_model(cfg, 7)
    assert load_into(same, state, "just") == [] and torch.equal(same.head.weight, state["head.weight"])
    other = build_ctc_model(cfg, 9)  # another vocabulary: a fresh head, the encoder all the same
    with pytest.warns(UserWarning, match="kept the initialisation"):
        left = load_into(other, state, "just")
    assert left == ["head.bias", "head.weight"]
    assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items() if k.startswith("encoder."))
