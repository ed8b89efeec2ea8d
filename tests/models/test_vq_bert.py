"""vq-wav2vec's BERT (``models.vq_bert``): its loss against a case computed by hand, BERT's
corruption of the masked tokens (nothing of a [MASK]ed token reaches the model), padding,
and the presets."""

from __future__ import annotations

import math

import pytest
import torch

from models import config as M
from models.factory import build_pretraining_model
from models.hf import hf_unsupported
from models.vq_bert import VqBertModel, masked_token_loss


def test_masked_token_loss_by_hand() -> None:
    # Frame 0: uniform over 2 tokens, target 1 -> ln 2 (argmax 0: wrong).
    # Frame 1: logits (ln 3, 0), target 0 -> -ln(3/4) (right). Frame 2: not masked, not counted.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 0.0]]])
    targets = torch.tensor([[1, 0, 1]])
    mask = torch.tensor([[True, True, False]])
    ce_sum, count, correct = masked_token_loss(logits, targets, mask)
    assert ce_sum.item() == pytest.approx(math.log(2.0) + math.log(4.0 / 3.0), abs=1e-6)
    assert count.item() == 2 and correct.item() == 1.0


def _model(**vq_bert: float) -> VqBertModel:
    cfg = M.vq_bert_laptop()
    for k, v in vq_bert.items():
        setattr(cfg.vq_bert, k, v)
    torch.manual_seed(0)
    return build_pretraining_model(cfg).eval()


def test_forward_loss_is_the_masked_tokens_cross_entropy_of_its_logits() -> None:
    model = _model()
    tokens = torch.randint(0, model.codebook_size, (2, 40))
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[1, 30:] = True
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, 3:8] = True
    mask[1, 25:35] = True  # 5 of them padding: not counted
    out = model(tokens, pad, mask_time_indices=mask, generator=torch.Generator().manual_seed(1))
    assert out.num_masked.item() == 10
    expected = torch.nn.functional.cross_entropy(out.logits[:, :, 0][out.mask_time_indices],
                                                 tokens[out.mask_time_indices], reduction="sum")
    assert out.loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.logits.shape == (2, 40, 1, model.codebook_size)
    assert out.target_ids[..., 0][~pad].equal(tokens[~pad])


def test_a_masked_token_reaches_the_model_as_mask_only() -> None:
    model = _model(random_token_prob=0.0, leave_unmasked_prob=0.0)
    tokens = torch.randint(0, model.codebook_size, (1, 30))
    mask = torch.zeros(1, 30, dtype=torch.bool)
    mask[0, 10:15] = True
    other = tokens.clone()
    other[0, 10:15] = (other[0, 10:15] + 1) % model.codebook_size
    a = model(tokens, mask_time_indices=mask).last_hidden_state
    b = model(other, mask_time_indices=mask).last_hidden_state
    torch.testing.assert_close(a, b)
    unmasked = tokens.clone()
    unmasked[0, 20] = (unmasked[0, 20] + 1) % model.codebook_size
    assert not torch.allclose(a, model(unmasked, mask_time_indices=mask).last_hidden_state)


def test_bert_corruption_shares() -> None:
    model = _model()  # 10% random, 10% kept, 80% [MASK]
    tokens = torch.randint(0, model.codebook_size, (4, 5000))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    corrupted = model.corrupt(tokens, mask, torch.Generator().manual_seed(0))
    share_mask = (corrupted == model.encoder.mask_id).float().mean().item()
    assert 0.78 < share_mask < 0.82
    assert ((corrupted != tokens) & (corrupted != model.encoder.mask_id)).float().mean().item() > 0.08
    assert corrupted[~mask].numel() == 0
    kept = model.corrupt(tokens, torch.zeros_like(mask), torch.Generator().manual_seed(0))
    assert kept.equal(tokens)


def test_presets() -> None:
    base = M.vq_bert()
    assert (base.transformer.num_layers, base.transformer.dim, base.transformer.ffn_dim,
            base.transformer.num_heads) == (12, 768, 3072, 12)
    assert (base.mask.prob, base.mask.length) == (0.5, 10) and base.frame_stride == 160
    assert base.label_classes == base.vq_bert.vocab
    assert "vq_bert" in hf_unsupported(base)
    with pytest.raises(ValueError, match="int16"):
        M.VqBertConfig(vocab=40000)


def _ctc_with_tokeniser(vocab_size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(vq_bert's CTC model, the vq-wav2vec model whose front end and quantizer it carries),
    as fine-tuning builds it: the vq_bert config with the vq-wav2vec model's sections."""
    from models.factory import build_ctc_model

    torch.manual_seed(0)
    vq_cfg = M.vq_wav2vec_laptop()
    vq = build_pretraining_model(vq_cfg).eval()
    cfg = M.vq_bert_laptop()
    cfg.frontend, cfg.encoder, cfg.vq_wav2vec = vq_cfg.frontend, vq_cfg.encoder, vq_cfg.vq_wav2vec
    cfg.mask.channel_prob, cfg.mask.channel_length = 0.2, 4
    ctc = build_ctc_model(cfg, vocab_size)
    ctc.tokeniser.frontend.load_state_dict(vq.encoder.feature_encoder.state_dict())
    ctc.tokeniser.quantizer.load_state_dict(vq.quantizer.state_dict())
    return ctc, vq


def test_the_ctc_model_reads_audio_through_its_tokeniser_one_utterance_at_a_time() -> None:
    """vq_bert fine-tunes behind the tokeniser of its label set: each utterance of a padded
    batch gets the vq-wav2vec model's own codeword pairs of it alone, through the vocabulary
    (pairs it lacks are the unknown id); the BERT and the CTC head read those tokens; the
    tokeniser is frozen and travels in the state dict."""
    from models.vq_bert import pair_index

    ctc, vq = _ctc_with_tokeniser(30)
    gen = torch.Generator().manual_seed(1)
    long, short = torch.randn(4000, generator=gen), 3.0 * torch.randn(2400, generator=gen)
    seen = pair_index(vq.tokens(long.unsqueeze(0))[0][0], ctc.tokeniser.entries)
    vocabulary = seen.unique()[::2]  # half of the pairs it uses: the rest are unknown
    ctc.tokeniser.set_vocabulary(vocabulary)
    expected = []
    for wave in (long, short):
        pairs = pair_index(vq.tokens(wave.unsqueeze(0))[0][0], ctc.tokeniser.entries).tolist()
        ids = [vocabulary.tolist().index(p) if p in vocabulary.tolist() else ctc.tokeniser.vocab - 1 for p in pairs]
        expected.append(ids)
    assert ctc.tokeniser.vocab - 1 in expected[0] and min(expected[0]) == 0

    source = torch.zeros(2, 4000)
    source[0], source[1, :2400] = long, short
    pad = torch.zeros(2, 4000, dtype=torch.bool)
    pad[1, 2400:] = True
    ids, lengths = ctc.tokeniser(source, pad)
    assert lengths.tolist() == [len(e) for e in expected]
    assert ids[0].tolist() == expected[0] and ids[1, : lengths[1]].tolist() == expected[1]

    ctc.eval()
    with torch.no_grad():
        out = ctc(source, pad)
        alone = ctc.head(ctc.encoder(torch.tensor([expected[1]])))  # the BERT on its tokens, then the head
    assert out.output_lengths.tolist() == lengths.tolist() and out.padding_mask[1, lengths[1]:].all()
    assert torch.allclose(out.logits[1, : lengths[1]], alone[0], atol=1e-5)

    # Training: masked tokens reach the BERT as [MASK]; only the BERT and the head learn.
    ctc.train()
    inputs: list[torch.Tensor] = []
    ctc.encoder.embedding.register_forward_hook(lambda _m, args, _o: inputs.append(args[0]))
    ctc(source, pad, generator=torch.Generator().manual_seed(0)).logits.square().mean().backward()
    assert (inputs[-1] == ctc.encoder.mask_id).any() and not (inputs[-1][1, lengths[1]:] == ctc.encoder.mask_id).any()
    assert all(p.grad is None and not p.requires_grad for p in ctc.tokeniser.parameters())
    assert ctc.encoder.embedding.weight.grad is not None and ctc.head.weight.grad is not None

    again, _ = _ctc_with_tokeniser(30)
    again.load_state_dict(ctc.state_dict(), strict=True)  # the vocabulary is in the state
    assert torch.equal(again.tokeniser(source, pad)[0], ids)
    with pytest.raises(ValueError, match="distinct"):
        ctc.tokeniser.set_vocabulary(torch.tensor([3, 3]))


def test_fine_tuning_takes_the_bert_and_not_its_lm_head() -> None:
    """A vq_bert checkpoint initialises the CTC model's BERT; its LM head (whose bias has the
    CTC head's name, here even its shape) is not a CTC head, and the tokeniser is not in it."""
    import warnings

    from models.checkpoint import load_into

    bert = _model()
    with torch.no_grad():
        bert.head.bias.normal_()
    ctc, _ = _ctc_with_tokeniser(M.vq_bert_laptop().vq_bert.vocab)
    head_before = ctc.head.bias.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        left = load_into(ctc, bert.state_dict(), "vq_bert")
    assert torch.equal(ctc.encoder.embedding.weight, bert.encoder.embedding.weight)
    assert torch.equal(ctc.head.bias, head_before) and not torch.equal(ctc.head.bias, bert.head.bias)
    assert {"head.weight", "head.bias", "tokeniser.pairs"} <= set(left)
    assert all(k.startswith(("head.", "tokeniser.")) for k in left)


def test_tokenised_bert_tokenises_each_utterance_whole_and_pads_the_rest() -> None:
    import numpy as np

    from models.vq_bert import TokenisedBert

    bert = _model().encoder
    seen: list[int] = []

    def tokenise(audio: np.ndarray) -> np.ndarray:
        # A tokeniser whose ids depend on the whole utterance (as wav2vec 1.0's per-utterance
        # normalisation makes them): padding handed to it would change every token.
        seen.append(len(audio))
        frames = len(audio) // 160
        level = int(abs(audio).sum() * 1000) % 7
        return (np.arange(frames) + level) % bert.vocab

    model = TokenisedBert(bert, tokenise).eval()
    gen = torch.Generator().manual_seed(0)
    long, short = torch.randn(3200, generator=gen), torch.randn(1600, generator=gen)
    source = torch.zeros(2, 3200)
    source[0], source[1, :1600] = long, short
    pad = torch.zeros(2, 3200, dtype=torch.bool)
    pad[1, 1600:] = True
    ids, lengths = model.tokens(source, pad)
    assert seen == [3200, 1600] and lengths.tolist() == [20, 10]
    assert ids[1, :10].tolist() == tokenise(short.numpy()).tolist() and ids[1, 10:].eq(0).all()
    with torch.no_grad():
        batched = model(source, pad)
        alone = model(short.unsqueeze(0))
    assert torch.allclose(batched[1, :10], alone[0], atol=1e-5), "padding changed the states of the shorter one"
    with pytest.raises(ValueError, match="outside the BERT's vocabulary"):
        TokenisedBert(bert, lambda a: np.full(len(a) // 160, bert.vocab + 3)).tokens(source)


def test_its_weights_are_saved_and_loaded_with_the_tied_lm_head(tmp_path) -> None:
    """The LM head reads the input embedding (one tensor under two names): the weights file
    holds both names and a fresh model loads it strictly, its head still tied."""
    from models.checkpoint import load_weights, save_weights

    model = _model()
    assert model.head.embedding.weight is model.encoder.embedding.weight
    path = save_weights(model, tmp_path)
    state = load_weights(path)
    assert set(state) == set(model.state_dict())
    torch.manual_seed(1)
    fresh = build_pretraining_model(M.vq_bert_laptop()).eval()
    fresh.load_state_dict(state, strict=True)
    assert fresh.head.embedding.weight is fresh.encoder.embedding.weight
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_scaled_embedding_is_level_with_the_sinusoids() -> None:
    """With ``scale_embedding`` the tokens enter the Transformer at unit spread per channel
    (init std D^-0.5, times sqrt(D)), as large as the fixed sinusoids added to them; without
    it, RoBERTa's std 0.02 leaves the tokens a small fraction of the positions."""
    from models.transformer import sinusoid_positions

    tokens = torch.arange(0, 400).remainder(511).view(2, 200)
    positions = sinusoid_positions(200, 64, torch.zeros(1)).norm(dim=-1).mean()
    ratios = {}
    for scaled in (False, True):
        enc = _model(scale_embedding=scaled).encoder
        x = enc.embed(tokens)
        ratios[scaled] = (x.norm(dim=-1).mean() / positions).item()
        seen: list[torch.Tensor] = []
        hook = enc.transformer.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0]))
        enc(tokens)
        hook.remove()
        torch.testing.assert_close(seen[0], x)  # what the Transformer reads (eval: no dropout)
    assert 0.02 < ratios[False] < 0.05 and 1.2 < ratios[True] < 1.6


def test_an_untied_lm_head_has_weights_of_its_own_and_is_not_a_ctc_head() -> None:
    """``tie_embedding`` False: the LM head's matrix is a parameter apart from the embedding
    (training one leaves the other), a strict round trip keeps them apart, and fine-tuning
    takes neither the LM head's matrix nor its bias, even for a CTC vocabulary of K."""
    import warnings

    from models.checkpoint import load_into

    model = _model(tie_embedding=False)
    assert model.head.embedding is None and model.head.output.shape == (model.codebook_size, 64)
    model.train()
    tokens = torch.randint(0, model.codebook_size, (2, 60))
    mask = torch.zeros(2, 60, dtype=torch.bool)
    mask[:, 10:20] = True
    model(tokens, mask_time_indices=mask, generator=torch.Generator().manual_seed(0)).loss_sum.backward()
    assert model.head.output.grad is not None and model.head.output.grad.abs().sum() > 0
    assert not torch.equal(model.head.output, model.encoder.embedding.weight[: model.codebook_size])
    fresh = _model(tie_embedding=False)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert "head.output" in model.state_dict() and "head.embedding.weight" not in model.state_dict()
    ctc, _ = _ctc_with_tokeniser(model.codebook_size)
    head_before = ctc.head.weight.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        left = load_into(ctc, model.state_dict(), "vq_bert")
    assert torch.equal(ctc.head.weight, head_before) and {"head.weight", "head.bias"} <= set(left)
    assert torch.equal(ctc.encoder.embedding.weight, model.encoder.embedding.weight)
