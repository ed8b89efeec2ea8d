"""Numerical equivalence with ``transformers.Wav2Vec2ForPreTraining`` (fp32, CPU).

Same random weights (converted by ``models.hf``), same input with padding, same
``mask_time_indices`` and distractors: hidden states, projected context, projected
targets, contrastive and diversity losses agree within 1e-5 (relative for sums).

Where Hugging Face differs from fairseq, and what wavray follows:

- Feature penalty: fairseq adds ``10 * mean(z**2)`` (BASE); HF has none. We follow
  fairseq (weight in ``model.loss.feature_penalty_weight``); comparisons here set it to 0.
  fairseq averages over padded frames too; we exclude padding (equal without padding).
- Gradient into the feature encoder: fairseq scales it (``feature_grad_mult`` 0.1); HF
  does not. We follow fairseq; comparisons here use 1.0.
- Gumbel temperature: fairseq decays it per update, ``max(2 * 0.999995**step, 0.5)``;
  HF keeps a plain float attribute (2) that its example script decays. We follow
  fairseq, in a buffer (checkpointed).
- Diversity loss: both use ``(G*V - sum_g exp(H_g)) / (G*V)``, but HF returns it
  multiplied by the number of masked frames, and in eval mode computes it from the hard
  (argmax) distribution, fairseq always from the averaged softmax. We follow fairseq:
  ``diversity_loss`` is per frame and uses ``prob_perplexity``; the eval comparison below
  rebuilds HF's value from our ``code_perplexity``.
- Perplexity: fairseq uses ``p * log(p + 1e-7)``, HF ``xlogy``; we use ``xlogy`` (exact).
  Both measure it over masked frames only (fairseq quantizes only those); so do we.
- Loss reduction: both sum cross-entropy over masked frames; so do we (``contrastive_sum``).
- Distractor layout: HF's ``sampled_negative_indices`` are (B, T, K) indices into the
  flattened batch (offset ``b * T``), with entries for unmasked frames ignored; fairseq
  samples (K, B, M) over the M masked frames per row (it needs equal M per row and trims
  masks to the batch minimum, ``require_same_masks``). Ours are (B, T, K) per-utterance
  frame indices; masks keep their own size per row.
- Identical distractors: fairseq and HF compare the projected vectors exactly and give
  -inf to equal ones; we compare the codeword choices (in training the straight-through
  estimator perturbs the last bit, which can hide true duplicates from the float test).
  Both agree here.
- Masking: both replace masked frames of the *projected* features (after the projection
  dropout) by one learned vector and quantize the unmasked normalised latents (after
  ``dropout_features``); so do we. HF samples mask starts from ``n - length + 1``
  positions, fairseq from ``n - length``; we follow fairseq.
- Quantizer in eval mode: both take the argmax without noise; so do we. In training both
  use ``gumbel_softmax(hard=True)``; our noise comes from an explicit generator, so the
  training-mode comparison seeds HF's global RNG and our generator alike.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from models.factory import build_pretraining_model  # noqa: E402
from models.hf import model_config_to_hf, pretraining_state_to_hf  # noqa: E402
from models.masking import compute_span_mask, sample_negatives  # noqa: E402

TOL = 1e-5


def _pair(cfg):
    torch.manual_seed(0)
    ours = build_pretraining_model(cfg)
    hf_cfg = transformers.Wav2Vec2Config.from_dict(model_config_to_hf(cfg))
    hf = transformers.Wav2Vec2ForPreTraining(hf_cfg)
    hf.load_state_dict(pretraining_state_to_hf(ours.state_dict()), strict=True)
    return ours, hf


def _batch(ours, cfg):
    batch, samples = 2, 16000
    gen = torch.Generator().manual_seed(1)
    source = torch.randn(batch, samples, generator=gen)
    pad = torch.zeros(batch, samples, dtype=torch.bool)
    pad[1, 12800:] = True
    source[pad] = 0.0
    fe = ours.encoder.feature_encoder
    lengths = fe.output_lengths((~pad).sum(1))
    frames = int(fe.output_lengths(torch.tensor(samples)))
    mask = compute_span_mask(
        (batch, frames), mask_prob=cfg.mask.prob, mask_length=cfg.mask.length, min_masks=2, lengths=lengths,
        generator=gen,
    )
    neg = sample_negatives(mask, cfg.loss.num_negatives, generator=gen)
    neg_hf = neg + (torch.arange(batch) * frames).view(batch, 1, 1)  # HF indexes the flattened batch
    return source, pad, mask, neg, neg_hf


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert err <= TOL * scale, f"{what}: max abs difference {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("mode", ["default", "layer_norm"])
def test_eval_outputs_and_losses_match_transformers(small_config, mode):
    cfg = small_config(mode)
    ours, hf = _pair(cfg)
    ours.eval()
    hf.eval()
    source, pad, mask, neg, neg_hf = _batch(ours, cfg)
    attn = (~pad).long()
    with torch.no_grad():
        o = ours(source, pad, mask_time_indices=mask, negative_indices=neg)
        h = hf(source, attention_mask=attn, mask_time_indices=mask, sampled_negative_indices=neg_hf)
        base = hf.wav2vec2(source, attention_mask=attn, mask_time_indices=mask)

    _close(o.last_hidden_state, base.last_hidden_state, "last hidden state")
    _close(o.projected_context, h.projected_states, "projected context")
    _close(o.projected_quantized, h.projected_quantized_states, "projected quantized targets")
    _close(o.contrastive_sum, h.contrastive_loss, "contrastive loss (sum)")
    gv = cfg.quantizer.groups * cfg.quantizer.entries
    hf_style_diversity = (gv - o.code_perplexity.sum()) / gv * o.num_masked  # HF eval: hard choices, x count
    _close(hf_style_diversity, h.diversity_loss, "diversity loss")
    _close(o.code_perplexity.sum(), h.codevector_perplexity, "code perplexity")
    # With 6 codewords per group duplicates occur: the -inf path was exercised and agrees.
    assert torch.isinf(o.logits[o.mask_time_indices]).any()
    # Our own diversity loss is fairseq's (averaged softmax), not HF's eval variant.
    torch.testing.assert_close(o.diversity_loss, (gv - o.prob_perplexity.sum()) / gv)


@pytest.mark.parametrize("mode", ["default", "layer_norm"])
def test_training_mode_losses_and_gradients_match_transformers(small_config, mode):
    """Gumbel noise from the same seed: losses, targets and every gradient agree."""
    cfg = small_config(mode)
    ours, hf = _pair(cfg)
    ours.train()
    hf.train()
    source, pad, mask, neg, neg_hf = _batch(ours, cfg)
    torch.manual_seed(7)  # HF draws its Gumbel noise from the global generator
    h = hf(source, attention_mask=(~pad).long(), mask_time_indices=mask, sampled_negative_indices=neg_hf)
    o = ours(source, pad, mask_time_indices=mask, negative_indices=neg, generator=torch.Generator().manual_seed(7))

    _close(o.projected_quantized, h.projected_quantized_states, "projected quantized targets (train)")
    _close(o.contrastive_sum, h.contrastive_loss, "contrastive loss (train)")
    _close(o.diversity_loss * o.num_masked, h.diversity_loss, "diversity loss (train, x count)")
    _close(o.loss_sum, h.loss, "total loss (train)")

    h.loss.backward()
    o.loss_sum.backward()
    ours_grads = pretraining_state_to_hf(
        {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in ours.named_parameters()}
    )
    for name, p in hf.named_parameters():
        theirs = p.grad if p.grad is not None else torch.zeros_like(p)
        scale = max(theirs.abs().max().item(), 1e-3)  # key biases have (numerically) zero gradient
        err = (ours_grads[name] - theirs).abs().max().item()
        assert err <= 1e-4 * scale, f"gradient of {name}: max abs difference {err:.3g} (scale {scale:.3g})"
