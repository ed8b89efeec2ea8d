"""The frozen-encoder CTC probe: how much do an encoder's features say about the characters?

Pretraining losses cannot rank pretext tasks against each other (SPEC.md, last
section). This probe can: freeze the encoder, extract its hidden states for a small
labelled set once, train a small CTC head on them for a fixed budget, and report the
character error rate on a labelled dev set (greedy decoding). The same code scores a
sweep trial, a baseline frontend (log-mel) and a randomly initialised encoder, so its
numbers compare like with like (CPC's probe table; SUPERB's weighted layer sum).

- Features: one hidden state (``probe.layer``: 0 = the Transformer's input after the
  positional convolution, i = output of layer i) or a learned softmax-weighted sum of
  all of them (``probe.weighted_sum``). Each hidden state is standardised per channel
  with statistics of the training set, so log-mel features (large offsets) and
  Transformer states train equally well.
- Head: Linear -> 2-layer BiLSTM (or two 1-D convolutions, or nothing) -> Linear, CTC loss
  with the blank at 0, AdamW, gradient clipping 5, ``probe.steps`` updates of
  ``probe.batch_size`` utterances.
- Deterministic for a seed: head initialisation and batch order come from the seed; the
  global RNG state and the encoder's train/eval mode are left as they were.
- No Ray, no DeepSpeed: :func:`run_probe` takes an ``nn.Module`` and in-memory data. A
  sweep's trial driver loads ``sets = probe_sets(cfg)`` once and scores each checkpoint
  its run writes (``pipeline/tune``); the benchmarks call it on finished models.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.masking import frame_padding_mask
from models.wav2vec2 import Wav2Vec2Encoder
from pipeline.config import Config, ProbeConfig
from pipeline.data.batching import normalize as normalized
from pipeline.text import Vocabulary, error_rates, greedy_decode

# --- labelled data in memory ---------------------------------------------------------------


@dataclass
class LabelledSet:
    """Utterances with transcripts, decoded to float32 at 16 kHz."""

    ids: list[str]
    audio: list[np.ndarray]
    transcripts: list[str]
    speakers: list[str] = field(default_factory=list)
    sample_rate: int = 16000
    languages: list[str] = field(default_factory=list)
    """Each utterance's language ("" where none was named), for per-language error rates."""

    def __post_init__(self) -> None:
        n = len(self.ids)
        if len(self.audio) != n or len(self.transcripts) != n:
            raise ValueError(
                f"LabelledSet: {n} ids, {len(self.audio)} audio arrays, {len(self.transcripts)} transcripts"
            )
        if not self.speakers:
            self.speakers = [""] * n
        if not self.languages:
            self.languages = [""] * n
        if len(self.speakers) != n or len(self.languages) != n:
            raise ValueError(f"LabelledSet: {n} ids, {len(self.speakers)} speakers, {len(self.languages)} languages")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def minutes(self) -> float:
        return sum(len(a) for a in self.audio) / self.sample_rate / 60.0

    def select(self, indices: Sequence[int]) -> LabelledSet:
        idx = [int(i) for i in indices]
        return LabelledSet(
            ids=[self.ids[i] for i in idx], audio=[self.audio[i] for i in idx],
            transcripts=[self.transcripts[i] for i in idx], speakers=[self.speakers[i] for i in idx],
            sample_rate=self.sample_rate, languages=[self.languages[i] for i in idx],
        )

    def take_minutes(self, minutes: float, seed: int = 0, *, by_language: bool = False) -> LabelledSet:
        """The first utterances of a seeded shuffle, up to ``minutes`` of audio (at least one;
        :func:`pick_minutes`)."""
        return self.select(pick_minutes([len(a) for a in self.audio], self.languages, minutes * 60.0 * self.sample_rate,
                                        seed=seed, by_language=by_language))


def pick_minutes(lengths: Sequence[int], languages: Sequence[str], budget: float, *, seed: int = 0,
                 by_language: bool = False) -> list[int]:
    """Sorted indices of the first utterances of a seeded shuffle whose ``lengths`` (samples)
    fit ``budget`` samples (at least one; a longer one is passed over for shorter ones).

    ``by_language``: the languages take turns in that order (each one's utterances in the
    shuffle's order), so a small budget still holds every language."""
    order = np.random.default_rng(seed).permutation(len(lengths)).tolist()
    if by_language:
        queues: dict[str, list[int]] = {}
        for i in order:
            queues.setdefault(languages[i], []).append(i)
        order = [q[k] for k in range(max(map(len, queues.values()), default=0))
                 for q in (queues[lang] for lang in sorted(queues)) if k < len(q)]
    chosen, total = [], 0
    for i in order:
        if chosen and total + lengths[i] > budget:
            continue
        chosen.append(i)
        total += lengths[i]
    return sorted(chosen)


def load_labelled_set(
    uri: str,
    *,
    split: str = "all",
    speakers: Sequence[str] | None = None,
    exclude_speakers: Sequence[str] | None = None,
    s3_endpoint: str = "",
    s3_region: str = "",
    minutes: float = 0.0,
    seed: int = 0,
    by_language: bool = False,
) -> LabelledSet:
    """Read the transcribed utterances of a prepared dataset (``jobs.prepare`` output).

    ``split``: ``train``, ``valid`` or ``all``. Utterances without a transcript are left
    out; a dataset with none left raises ``ValueError`` naming it. ``minutes`` > 0: only
    :meth:`LabelledSet.take_minutes`' choice of them (``seed``, ``by_language``), chosen from
    the shards' other columns before any audio is read, so a large split costs its
    metadata, not its audio. Decodes in this process: meant for probe, dev and evaluation
    sets (minutes to hours).
    """
    from pipeline.data import schema as S
    from pipeline.data import storage
    from pipeline.data.audio import decode_segment
    from pipeline.data.loader import read_dataset_info

    if split not in ("train", "valid", "all"):
        raise ValueError(f"split: expected 'train', 'valid' or 'all', got {split!r}")
    store = storage.Storage.from_config(s3_endpoint, s3_region)
    info = read_dataset_info(uri, store)
    shards = [s for sp in S.SPLITS if split in (sp, "all") for s in info.split(sp)]
    keep_speakers = set(speakers) if speakers else None
    drop_speakers = set(exclude_speakers or ())
    # A dataset prepared before the language column has none in its shards (nor its summary).
    named = [S.LANGUAGE] if any("languages" in info.summary.get("splits", {}).get(sp, {}) for sp in S.SPLITS) else []
    rows: list[tuple[str, int, int, int, str, str, str]] = []  # id, shard, row, samples, text, speaker, language
    unlabelled = 0
    for k, shard in enumerate(shards):
        table = storage.read_table(
            info.uri(shard), columns=[S.ID, S.NUM_SAMPLES, S.TRANSCRIPT, S.SPEAKER, *named], storage_=store
        )
        cols = {c: table.column(c).to_pylist() for c in (S.ID, S.NUM_SAMPLES, S.TRANSCRIPT, S.SPEAKER, *named)}
        for i, utt in enumerate(cols[S.ID]):
            speaker = cols[S.SPEAKER][i] or ""
            if (keep_speakers is not None and speaker not in keep_speakers) or speaker in drop_speakers:
                continue
            text = cols[S.TRANSCRIPT][i]
            if not text or not text.strip():
                unlabelled += 1
                continue
            lang = (cols[S.LANGUAGE][i] or "") if named else ""
            rows.append((utt, k, i, int(cols[S.NUM_SAMPLES][i]), text, speaker, lang))
    if not rows:
        raise ValueError(
            f"{uri}: no transcribed utterances in split {split!r}"
            + (f" for speakers {sorted(keep_speakers)}" if keep_speakers else "")
            + (f" ({unlabelled} without a transcript)" if unlabelled else "")
            + "; prepare it with a transcripts sidecar (jobs.prepare --sidecar)"
        )
    rows.sort(key=lambda r: r[0])  # shard order is an implementation detail
    if minutes > 0:
        picked = pick_minutes([r[3] for r in rows], [r[6] for r in rows], minutes * 60.0 * info.sample_rate,
                              seed=seed, by_language=by_language)
        rows = [rows[i] for i in picked]
    by_shard: dict[int, list[tuple[int, int]]] = {}  # shard -> (row, samples) of the utterances kept
    for r in rows:
        by_shard.setdefault(r[1], []).append((r[2], r[3]))
    audio: dict[tuple[int, int], np.ndarray] = {}
    for k, wanted in sorted(by_shard.items()):
        column = storage.read_table(info.uri(shards[k]), columns=[S.AUDIO], storage_=store).column(S.AUDIO)
        for i, n in wanted:
            audio[(k, i)] = decode_segment(column[i].as_buffer(), 0, n)
    return LabelledSet(
        ids=[r[0] for r in rows], audio=[audio[(r[1], r[2])] for r in rows], transcripts=[r[4] for r in rows],
        speakers=[r[5] for r in rows], sample_rate=info.sample_rate, languages=[r[6] for r in rows],
    )


def _same_dataset(a: str, b: str) -> bool:
    """Whether two dataset locations name the same data (local paths compared absolute)."""
    from pipeline.data import storage

    def norm(uri: str) -> str:
        return uri.rstrip("/") if "://" in uri else str(Path(uri).expanduser().resolve())

    return storage.is_s3(a) == storage.is_s3(b) and norm(a) == norm(b)


def probe_sets(cfg: Config) -> tuple[LabelledSet, LabelledSet]:
    """The probe's (train, dev) sets as ``cfg.probe`` names them, loaded once per run.

    Each is the first ``*_minutes`` of a seeded shuffle of its dataset split. When both
    come from the same dataset, the dev set is drawn from what the train set left: no
    utterance is in both, whatever the splits say (``all`` holds both).
    """
    p = cfg.probe
    if not p.train_uri:
        raise ValueError("probe.train_uri: expected a prepared dataset with transcripts, got ''")
    kw = {"s3_endpoint": cfg.data.s3_endpoint, "s3_region": cfg.data.s3_region}
    full_train = load_labelled_set(p.train_uri, split=p.train_split, **kw)
    train = full_train.take_minutes(p.train_minutes, seed=p.seed)
    dev_uri = p.dev_uri or p.train_uri
    same = _same_dataset(dev_uri, p.train_uri)
    full_dev = full_train if same and p.dev_split == p.train_split else load_labelled_set(
        dev_uri, split=p.dev_split, **kw
    )
    if same:
        taken = set(train.ids)
        full_dev = full_dev.select([i for i, u in enumerate(full_dev.ids) if u not in taken])
        if len(full_dev) == 0:
            raise ValueError(
                f"probe: {dev_uri} [{p.dev_split}] has no utterances left for the dev set after the "
                f"probe's training set (probe.train_minutes = {p.train_minutes} of [{p.train_split}]); "
                "set probe.dev_uri or probe.dev_split"
            )
    return train, full_dev.take_minutes(p.dev_minutes, seed=p.seed)


# --- hidden states of a frozen encoder -------------------------------------------------------


def _encoder_of(model: nn.Module) -> nn.Module:
    """The part of ``model`` whose hidden states the probe reads."""
    from models.vq_bert import TokenisedBert, VqBertModel

    if isinstance(model, VqBertModel):
        raise ValueError(
            "a vq_bert model reads vq-wav2vec's tokens, not audio: probe it with its tokeniser in front "
            "(pipeline.label.tokens.audio_model, as jobs.bench probe does)"
        )
    if isinstance(model, TokenisedBert):
        return model
    enc = getattr(model, "encoder", None)
    if isinstance(enc, Wav2Vec2Encoder):
        return enc
    return model


def _input_is_a_state(enc: Wav2Vec2Encoder) -> bool:
    """Whether the context network's input is one of its hidden states: not where the context
    network widens it (APC's GRU reads 80 log-mel channels and keeps 512): every state has
    the width of the last."""
    return enc.feature_projection.out_dim == enc.dim


def num_hidden_states(model: nn.Module) -> int:
    """How many hidden states :func:`hidden_states` returns for ``model``."""
    from models.vq_bert import TokenisedBert

    enc = _encoder_of(model)
    if isinstance(enc, Wav2Vec2Encoder):
        return len(enc.transformer.layers) + int(_input_is_a_state(enc))
    if isinstance(enc, TokenisedBert):
        return len(enc.bert.transformer.layers) + 1
    return 1


@torch.no_grad()
def hidden_states(model: nn.Module, source: Tensor, padding_mask: Tensor | None) -> tuple[list[Tensor], Tensor]:
    """(hidden states, each (B, T, D); frame lengths (B,)) of ``source`` (B, S).

    A wav2vec 2.0 model (``Wav2Vec2Encoder`` or a model holding one as ``.encoder``) gives
    the Transformer's input (after the positional convolution, and its LayerNorm in
    post-LN models) and every layer's output; in pre-LN models the last one is taken after
    the final LayerNorm, as Hugging Face does. Any context network of that encoder (causal
    conv, GRU) gives its input and every layer's output the same way; a context network
    that widens its input has no state 0 (APC's GRU: its layers' outputs, as s3prl's
    upstream gives them). No masking (the model is in eval mode).
    vq_bert's BERT behind its tokeniser (:class:`models.vq_bert.TokenisedBert`) gives the
    token embedding and every layer's output the same way.
    Any other module is treated as a frontend: ``forward(source) -> (B, T, C)`` plus
    ``output_lengths(num_samples)`` (the conv feature encoder, :class:`LogMelFrontend`).
    """
    from models.vq_bert import TokenisedBert

    enc = _encoder_of(model)
    if isinstance(enc, TokenisedBert):
        ids, lengths = enc.tokens(source, padding_mask)
        return _layer_states(enc.bert.transformer, lambda: enc.bert(ids, frame_padding_mask(ids.shape[1], lengths)),
                             layer_norm_first=enc.bert.transformer.layer_norm_first), lengths
    if not isinstance(enc, Wav2Vec2Encoder):
        feats = enc(source)  # (B, T, C)
        if padding_mask is None:
            lengths = torch.full((source.shape[0],), feats.shape[1], dtype=torch.long, device=feats.device)
        else:
            lengths = enc.output_lengths((~padding_mask).long().sum(dim=1)).clamp(max=feats.shape[1])
        return [feats], lengths

    found: dict[str, Tensor] = {}

    def run() -> Tensor:
        features, frame_pad, found["lengths"] = enc.extract_features(source, padding_mask)  # (B, T, C)
        x, _ = enc.feature_projection(features)  # (B, T, D)
        return enc.transformer(x, frame_pad)  # (B, T, D)

    captured = _layer_states(enc.transformer, run, layer_norm_first=enc.transformer.layer_norm_first)
    if not _input_is_a_state(enc):
        captured = captured[1:]
    return captured, found["lengths"]


def _layer_states(transformer: nn.Module, run: Callable[[], Tensor], *, layer_norm_first: bool) -> list[Tensor]:
    """The input of ``transformer``'s first layer and every layer's output while ``run()``
    runs it; in pre-LN models the last is ``run()``'s result (after the final LayerNorm)."""
    captured: list[Tensor] = []
    layers = transformer.layers

    def grab_input(_module: nn.Module, args: tuple) -> None:
        captured.append(args[0])

    def grab_output(_module: nn.Module, _args: tuple, output: Tensor) -> None:
        captured.append(output)

    handles = [layers[0].register_forward_pre_hook(grab_input)]
    handles += [layer.register_forward_hook(grab_output) for layer in layers]
    try:
        last = run()
    finally:
        for h in handles:
            h.remove()
    if layer_norm_first:
        captured[-1] = last
    return captured


def batches_by_length(lengths: Sequence[int], max_samples: int) -> list[list[int]]:
    """Indices grouped by similar length under a padded-sample budget (little padding)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order.tolist():
        longest = max([lengths[j] for j in cur] + [lengths[i]])
        if cur and longest * (len(cur) + 1) > max_samples:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def pad_batch(audio: Sequence[np.ndarray], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """(source (B, S) float32, padding mask (B, S) True at padding, or None when no padding)."""
    width = max(len(a) for a in audio)
    source = np.zeros((len(audio), width), dtype=np.float32)
    pad = np.ones((len(audio), width), dtype=bool)
    for b, a in enumerate(audio):
        source[b, : len(a)] = a
        pad[b, : len(a)] = False
    mask = torch.from_numpy(pad).to(device) if pad.any() else None
    return torch.from_numpy(source).to(device), mask


@torch.no_grad()
def extract(
    model: nn.Module,
    data: LabelledSet,
    *,
    layers: Sequence[int] | None = None,
    normalize: bool = False,
    max_samples_per_batch: int = 16000 * 60,
) -> list[Tensor]:
    """Per utterance, the selected hidden states stacked: (L, T_i, D) float32 on the CPU.

    ``layers`` indexes :func:`hidden_states` (None: all). ``normalize``: zero mean, unit
    variance per utterance first (``data.normalize`` of the encoder's pretraining).
    Batches group utterances of similar length, so padding (which a group-norm feature
    encoder sees) stays small; the grouping is deterministic.
    """
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        total = num_hidden_states(model)
        chosen = list(range(total)) if layers is None else [range(total)[i] for i in layers]
        out: list[Tensor | None] = [None] * len(data)
        for group in batches_by_length([len(a) for a in data.audio], max_samples_per_batch):
            audio = [data.audio[i] for i in group]
            if normalize:
                audio = [normalized(a) for a in audio]
            source, pad = pad_batch(audio, device)
            states, lengths = hidden_states(model, source, pad)
            stacked = torch.stack([states[i] for i in chosen]).float().cpu()  # (L, B, T, D)
            for b, i in enumerate(group):
                out[i] = stacked[:, b, : int(lengths[b])].contiguous()  # (L, T_i, D)
        return [t for t in out if t is not None]
    finally:
        model.train(was_training)


# --- the head --------------------------------------------------------------------------------


class ProbeHead(nn.Module):
    """(L, B, T, D) standardised hidden states -> (B, T, V) CTC logits."""

    def __init__(self, num_states: int, dim: int, vocab_size: int, *, kind: str, hidden: int, weighted: bool):
        super().__init__()
        self.weighted = weighted and num_states > 1
        self.layer_logits = nn.Parameter(torch.zeros(num_states)) if self.weighted else None
        self.kind = kind
        self.inp = nn.Linear(dim, hidden)
        if kind == "bilstm":
            self.body: nn.Module | None = nn.LSTM(
                hidden, hidden // 2, num_layers=2, bidirectional=True, batch_first=True
            )
        elif kind == "conv":
            self.body = nn.Sequential(
                nn.Conv1d(hidden, hidden, 5, padding=2), nn.GELU(), nn.Conv1d(hidden, hidden, 5, padding=2), nn.GELU()
            )
        elif kind == "linear":
            self.body = None
        else:
            raise ValueError(f"probe.head: expected 'bilstm', 'conv' or 'linear', got {kind!r}")
        self.out = nn.Linear(hidden, vocab_size)

    def layer_weights(self) -> Tensor | None:
        return None if self.layer_logits is None else torch.softmax(self.layer_logits, dim=0)

    def forward(self, states: Tensor, lengths: Tensor) -> Tensor:
        if self.layer_logits is not None:
            w = torch.softmax(self.layer_logits, dim=0)  # (L,)
            x = torch.einsum("l,lbtd->btd", w, states)  # (B, T, D)
        else:
            x = states[0]  # (B, T, D)
        x = self.inp(x)  # (B, T, H)
        if self.kind == "bilstm":
            packed = nn.utils.rnn.pack_padded_sequence(
                x, lengths.cpu().clamp(min=1), batch_first=True, enforce_sorted=False
            )
            y, _ = self.body(packed)
            x, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])  # (B, T, H)
        elif self.kind == "conv":
            valid = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).unsqueeze(-1)
            x = self.body((x * valid).transpose(1, 2)).transpose(1, 2)  # (B, T, H)
        return self.out(x)  # (B, T, V)


@dataclass
class _Prepared:
    states: list[Tensor]
    """Per utterance (L, T_i, D), standardised."""
    targets: list[Tensor]
    """Per utterance (U_i,) long."""
    transcripts: list[str]


def _collate(items: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-utterance (L, T_i, D) -> ((L, B, T, D) zero-padded, lengths (B,))."""
    lengths = torch.tensor([t.shape[1] for t in items], dtype=torch.long)
    num_states, _, dim = items[0].shape
    out = torch.zeros(num_states, len(items), int(lengths.max()), dim)
    for b, t in enumerate(items):
        out[:, b, : t.shape[1]] = t
    return out.to(device), lengths.to(device)


def _standardize(feats: list[Tensor], stats: tuple[Tensor, Tensor] | None = None) -> tuple[list[Tensor], tuple]:
    if stats is None:
        cat = torch.cat(feats, dim=1)  # (L, sum T, D)
        mean = cat.mean(dim=1, keepdim=True)  # (L, 1, D)
        std = cat.std(dim=1, keepdim=True).clamp(min=1e-5)
        stats = (mean, std)
    mean, std = stats
    return [(f - mean) / std for f in feats], stats


def _ctc(head: ProbeHead, states: Tensor, lengths: Tensor, targets: list[Tensor]) -> tuple[Tensor, Tensor]:
    logits = head(states, lengths)  # (B, T, V)
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T, B, V)
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    flat = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    loss = F.ctc_loss(
        log_probs, flat.to(log_probs.device), lengths, target_lengths.to(log_probs.device), blank=0,
        reduction="sum", zero_infinity=True,
    )
    return loss, logits


def run_probe(
    model: nn.Module,
    train: LabelledSet,
    dev: LabelledSet,
    cfg: ProbeConfig | None = None,
    *,
    vocab: Vocabulary | None = None,
    normalize: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Train a CTC head on ``model``'s frozen features of ``train``; score it on ``dev``.

    Returns ``probe/cer``, ``probe/wer`` (greedy decoding on ``dev``), ``probe/dev_loss``
    and ``probe/train_loss`` (CTC per target character; train: mean over the last tenth of
    the updates), ``probe/cer_at_start`` (the untrained head's CER: the floor of nothing
    learned), ``probe/seconds`` and, with a weighted sum, ``probe/layer_weight_<i>``.
    ``model`` is not modified and keeps its train/eval mode; the global RNG is untouched.
    """
    cfg = cfg or ProbeConfig()
    vocab = vocab or Vocabulary.from_characters()
    if len(train) == 0 or len(dev) == 0:
        raise ValueError(f"run_probe: expected non-empty train and dev sets, got {len(train)} and {len(dev)}")
    t0 = time.perf_counter()
    total = num_hidden_states(model)
    layers = None if (cfg.weighted_sum and total > 1) else [cfg.layer]
    if layers is not None and not -total <= cfg.layer < total:
        raise ValueError(f"probe.layer: expected in [{-total}, {total - 1}] for this encoder, got {cfg.layer}")
    train_feats, stats = _standardize(extract(model, train, layers=layers, normalize=normalize))
    dev_feats, _ = _standardize(extract(model, dev, layers=layers, normalize=normalize), stats)
    run_device = torch.device(device) if device is not None else torch.device("cpu")
    tr = _Prepared(train_feats, [torch.tensor(vocab.encode(t), dtype=torch.long) for t in train.transcripts],
                   list(train.transcripts))
    dv = _Prepared(dev_feats, [torch.tensor(vocab.encode(t), dtype=torch.long) for t in dev.transcripts],
                   list(dev.transcripts))
    num_states, _, dim = tr.states[0].shape

    with torch.random.fork_rng(devices=[run_device] if run_device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        head = ProbeHead(num_states, dim, len(vocab), kind=cfg.head, hidden=cfg.hidden,
                         weighted=cfg.weighted_sum).to(run_device)
        metrics_start = _evaluate(head, dv, vocab, run_device)
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(cfg.seed)
        order: list[int] = []
        losses: list[float] = []
        batch = min(cfg.batch_size, len(tr.states))
        head.train()
        for step in range(cfg.steps):
            if len(order) < batch:
                order += torch.randperm(len(tr.states), generator=gen).tolist()
            idx, order = order[:batch], order[batch:]
            states, lengths = _collate([tr.states[i] for i in idx], run_device)
            targets = [tr.targets[i] for i in idx]
            loss_sum, _ = _ctc(head, states, lengths, targets)
            num_chars = max(1, sum(len(t) for t in targets))
            # Warm-up over the first 10% then constant: a short budget needs no decay.
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.steps // 10))
            opt.zero_grad(set_to_none=True)
            (loss_sum / num_chars).backward()
            nn.utils.clip_grad_norm_(head.parameters(), 5.0)
            opt.step()
            losses.append(float(loss_sum.detach()) / num_chars)
        metrics = _evaluate(head, dv, vocab, run_device)
    tail = losses[-max(1, len(losses) // 10):]
    out = {
        "probe/cer": metrics["cer"],
        "probe/wer": metrics["wer"],
        "probe/dev_loss": metrics["loss"],
        "probe/train_loss": float(np.mean(tail)),
        "probe/cer_at_start": metrics_start["cer"],
        "probe/train_minutes": train.minutes,
        "probe/dev_minutes": dev.minutes,
        "probe/seconds": time.perf_counter() - t0,
    }
    weights = head.layer_weights()
    if weights is not None:
        for i, w in enumerate(weights.detach().cpu().tolist()):
            out[f"probe/layer_weight_{i}"] = float(w)
    return out


@torch.no_grad()
def _evaluate(head: ProbeHead, data: _Prepared, vocab: Vocabulary, device: torch.device) -> dict[str, float]:
    was_training = head.training
    head.eval()
    hyps: list[str] = [""] * len(data.states)
    loss_total, chars = 0.0, 0
    order = sorted(range(len(data.states)), key=lambda i: data.states[i].shape[1])
    for start in range(0, len(order), 32):
        idx = order[start:start + 32]
        states, lengths = _collate([data.states[i] for i in idx], device)
        targets = [data.targets[i] for i in idx]
        loss_sum, logits = _ctc(head, states, lengths, targets)
        loss_total += float(loss_sum)
        chars += sum(len(t) for t in targets)
        for i, ids in zip(idx, greedy_decode(logits.argmax(-1), lengths, vocab.blank_id), strict=True):
            hyps[i] = vocab.decode(ids)
    head.train(was_training)
    refs = [vocab.normalize(t) for t in data.transcripts]
    rates = error_rates(refs, hyps)
    return {"cer": rates["cer"], "wer": rates["wer"], "loss": loss_total / max(1, chars) if chars else math.nan}
