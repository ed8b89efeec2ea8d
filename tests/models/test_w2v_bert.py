"""w2v-BERT: the loss against a hand-computed case (which frames count, the masked-LM targets
are the quantizer's ids of the unmasked input, the contrastive loss is wav2vec 2.0's on the
first blocks, the weights), where its gradients go, and its config."""

from __future__ import annotations

import pytest
import torch

from models import config as M
from models.factory import build_pretraining_model, count_parameters
from models.masking import sample_negatives
from models.w2v_bert import W2vBertModel


def _config(**w2v_bert: float) -> M.ModelConfig:
    cfg = M.w2v_bert_laptop()
    cfg.quantizer.groups, cfg.quantizer.entries = 2, 5  # two groups: the cross-entropy is their mean
    for name, value in w2v_bert.items():
        setattr(cfg.w2v_bert, name, value)
    return cfg


def _model(cfg: M.ModelConfig) -> W2vBertModel:
    torch.manual_seed(0)
    model = build_pretraining_model(cfg)
    assert isinstance(model, W2vBertModel)
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(source (2, S), padding (2, S): row 1 ends early, mask (2, T) with masked padded frames
    that must not count, distractors (2, T, K))."""
    gen = torch.Generator().manual_seed(1)
    source = torch.randn(2, 16000, generator=gen)
    pad = torch.zeros(2, 16000, dtype=torch.bool)
    pad[1, 9600:] = True  # 14 of the 24 log-mel frames are valid
    mask = torch.zeros(2, 24, dtype=torch.bool)
    mask[0, [2, 3, 4, 10, 20]] = True
    mask[1, [0, 1, 7, 8, 18, 19]] = True  # frames 18 and 19 are padding
    negatives = sample_negatives(mask & torch.arange(24).lt(torch.tensor([[24], [14]])), 4, generator=gen)
    return source, pad, mask, negatives


@torch.no_grad()
def test_the_loss_by_hand() -> None:
    cfg = _config(contrastive_weight=0.5, mlm_weight=2.0)
    model = _model(cfg).eval()
    source, pad, mask, negatives = _batch()
    out = model(source, pad, mask_time_indices=mask, negative_indices=negatives)

    # Which frames count: the masked ones, padding never.
    counted = mask.clone()
    counted[1, 14:] = False
    assert torch.equal(out.contrastive.mask_time_indices, counted) and int(out.contrastive.num_masked) == 9

    # The targets: the quantizer's ids of the unmasked, normalised features ...
    features, _, _ = model.encoder.extract_features(source, pad)
    _, normed = model.encoder.feature_projection(features)
    ids = model.quantizer.codes(normed)  # (B, T, G)
    assert torch.equal(out.target_ids, ids)
    # ... so another mask leaves them as they are, while the masked input changes the predictions.
    other = model(source, pad, mask_time_indices=torch.roll(mask, 1, dims=1), negative_indices=negatives)
    assert torch.equal(other.target_ids, ids) and not torch.allclose(other.mlm_logits, out.mlm_logits)

    # The masked-LM loss: cross-entropy at counted frames, averaged over the two groups.
    logp = out.mlm_logits.log_softmax(-1)  # (B, T, G, V)
    mlm = sum(-(logp[b, t, 0, ids[b, t, 0]] + logp[b, t, 1, ids[b, t, 1]]) / 2 for b, t in counted.nonzero().tolist())
    assert float(out.mlm_sum) == pytest.approx(float(mlm), rel=1e-5)

    # The contrastive loss: wav2vec 2.0's, of a one-block model with the same weights.
    w2v_cfg = _config()
    w2v_cfg.objective, w2v_cfg.transformer.num_layers = "wav2vec2", 1
    w2v = build_pretraining_model(w2v_cfg).eval()
    missing, unexpected = w2v.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith(("mlm_head.", "encoder.transformer.layers.1.")) for k in unexpected)
    ref = w2v(source, pad, mask_time_indices=mask, negative_indices=negatives)
    assert float(out.contrastive.contrastive_sum) == pytest.approx(float(ref.contrastive_sum), rel=1e-5)
    assert float(out.contrastive.loss_sum) == pytest.approx(float(ref.loss_sum), rel=1e-5)
    diversity = cfg.loss.diversity_weight * float(ref.diversity_loss)
    assert float(ref.loss_sum) == pytest.approx(float(ref.contrastive_sum) + 9 * diversity, rel=1e-5)
    assert ref.diversity_loss > 0

    # The weights.
    assert float(out.loss_sum) == pytest.approx(0.5 * float(ref.loss_sum) + 2.0 * float(mlm), rel=1e-5)
    # The masked-LM module is the second block, on the first block's output.
    assert not torch.allclose(out.last_hidden_state, out.contrastive.last_hidden_state)
    layer = model.encoder.transformer.layers[1]
    positions = model.encoder.transformer.positions(out.contrastive.last_hidden_state)
    frame_pad = out.contrastive.padding_mask
    again = layer(out.contrastive.last_hidden_state, frame_pad, positions)
    assert torch.allclose(out.last_hidden_state, again, atol=1e-5)


def test_the_masked_lm_trains_the_encoder_and_never_the_quantizer() -> None:
    source, pad, mask, negatives = _batch()
    mlm_only = _model(_config(contrastive_weight=0.0)).train()
    mlm_only(source, pad, mask_time_indices=mask, negative_indices=negatives,
             generator=torch.Generator().manual_seed(0)).loss_sum.backward()
    assert mlm_only.mlm_head.weight.grad.abs().sum() > 0
    # Both modules learn from it: the contrastive module's block is under the masked-LM module.
    assert mlm_only.encoder.transformer.layers[0].ffn1.fc1.weight.grad.abs().sum() > 0
    assert mlm_only.encoder.mask_embedding.weight.grad.abs().sum() > 0
    quantizer_grads = [p.grad for p in mlm_only.quantizer.parameters()]
    assert all(g is None or not g.any() for g in quantizer_grads), "an id has no gradient"

    contrastive_only = _model(_config(mlm_weight=0.0)).train()
    out = contrastive_only(source, pad, mask_time_indices=mask, negative_indices=negatives,
                           generator=torch.Generator().manual_seed(0))
    out.loss_sum.backward()
    assert contrastive_only.quantizer.weight_proj.weight.grad.abs().sum() > 0
    assert contrastive_only.mlm_head.weight.grad is None or not contrastive_only.mlm_head.weight.grad.any()
    assert contrastive_only.encoder.transformer.layers[1].ffn1.fc1.weight.grad is None or \
        not contrastive_only.encoder.transformer.layers[1].ffn1.fc1.weight.grad.any()
    # In training the targets are the Gumbel choices: the codewords the contrastive targets are made of.
    assert torch.equal(out.target_ids, out.contrastive.target_codes)


def test_the_split_and_the_presets() -> None:
    assert M.w2v_bert().w2v_bert_contrastive_layers == 8 and M.w2v_bert().transformer.num_layers == 24
    with torch.device("meta"):  # no memory: the sizes only
        big = build_pretraining_model(M.w2v_bert())
    assert 0.59e9 < count_parameters(big.encoder) < 0.61e9  # fairseq2's "600m"
    assert M.w2v_bert_laptop().w2v_bert_contrastive_layers == 1
    auto = M.w2v_bert_laptop()
    auto.transformer.num_layers, auto.w2v_bert.contrastive_layers = 12, 0
    assert auto.w2v_bert_contrastive_layers == 4  # a third: fairseq2's 300m split
    with pytest.raises(ValueError, match="contrastive_layers"):
        M.ModelConfig(objective="w2v_bert", transformer=M.best_rq_laptop().transformer,
                      w2v_bert=M.W2vBertConfig(contrastive_layers=2))
    with pytest.raises(ValueError, match="conformer"):
        M.ModelConfig(objective="w2v_bert")
    with pytest.raises(ValueError, match="nothing to learn"):
        M.W2vBertConfig(contrastive_weight=0.0, mlm_weight=0.0)
