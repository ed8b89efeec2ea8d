"""JUST's mix of labelled and unlabelled utterances (``data.labelled_ratio``), on top of
XLSR's language balancing, exactly resumable.

Checked three ways: the label weights by hand on a hand-written manifest (and the errors
of a split with nothing to mix); the driver's resampling over a long stream of a prepared
dataset of three languages with 20% labelled rows (the labelled share is r, the languages
keep hours^alpha, an epoch keeps its size); and end to end through the Ray Data training
input read by two workers, which delivers exactly the rows the driver counted, and which,
stopped mid-epoch and resumed from its merged position, delivers exactly the batches of
the uninterrupted stream.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataConfig, tiny
from pipeline.data import schema as S
from pipeline.data import storage
from pipeline.data import testing as T
from pipeline.data.batching import language_ratios
from pipeline.data.loader import (
    DatasetInfo,
    ShardInfo,
    _Settings,
    _spec,
    balance_languages,
    build_train_dataset,
    labelled_rows,
    plan_resampling,
    read_dataset_info,
    resample_ratios,
    shard_metadata,
    unit_rows,
)
from pipeline.data.position import DataPosition

# --- the weights, by hand ---------------------------------------------------------------------


def test_a_row_is_labelled_when_its_transcript_is_not_blank() -> None:
    got = labelled_rows(pa.chunked_array([["a b", None, "", "  \t"], [" x ", "\u3000"]]))
    assert got.tolist() == [True, False, False, False, True, False]
    assert labelled_rows(pa.nulls(2)).tolist() == [False, False]


def test_data_labelled_ratio_is_checked() -> None:
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="data.labelled_ratio"):
            DataConfig(labelled_ratio=bad)
    assert DataConfig(labelled_ratio=0.0).labelled_ratio == 0.0


def _hand_dataset(root: Path, rows: list[tuple[str | None, int, str | None]], *, transcripts: bool = True) -> DatasetInfo:
    """A prepared dataset's summary and manifest, without audio: ``rows`` of (language,
    samples, transcript), split over two shards. All that resampling reads."""
    half = len(rows) // 2
    parts = {"shards/v/train/part-00000-00.parquet": rows[:half], "shards/v/train/part-00001-00.parquet": rows[half:]}
    columns: dict[str, list] = {S.SHARD: [], S.ROW: [], S.NUM_SAMPLES: [], S.LANGUAGE: [], S.TRANSCRIPT: []}
    for path, part in parts.items():
        for i, (lang, n, text) in enumerate(part):
            for name, value in zip(columns, (path, i, n, lang, text), strict=True):
                columns[name].append(value)
    if not transcripts:
        del columns[S.TRANSCRIPT]
    schema = pa.schema([S.MANIFEST_SCHEMA.field(name) for name in columns])
    pq.write_table(pa.table(columns, schema=schema), root / S.MANIFEST_FILE)
    shards = tuple(ShardInfo(path=p, split="train", num_rows=len(part), num_samples=sum(n for _, n, _ in part),
                             num_bytes=1) for p, part in parts.items())
    languages = {lang or "": {} for lang, _, _ in rows}
    return DatasetInfo(root=str(root), version="v", sample_rate=16000, shards=shards,
                       summary={"splits": {"train": {"languages": languages}}})


def test_label_weights_by_hand_count_rows_after_language_balancing(tmp_path: Path) -> None:
    """aa: 4 rows of 1 s, 1 labelled; bb: 12 rows of 1 s, 9 labelled; a labelled aa row too
    short to train on. p is the labelled share of the usable rows, each counted with its
    language's ratio: (r_aa + 9 r_bb) / (4 r_aa + 12 r_bb), not 10/16, nor 11/17 with the
    short row; the weights then make the expected labelled share r and keep the rows."""
    rows = ([("aa", 16000, "yes")] + [("aa", 16000, None)] * 3 + [("bb", 16000, "oui")] * 9
            + [("bb", 16000, " ")] * 2 + [("bb", 16000, None)] + [("aa", 100, "short")])
    info = _hand_dataset(tmp_path, rows)
    cfg = DataConfig(train_uri=str(tmp_path), min_sample_size=8000, max_sample_size=16000, language_alpha=0.5,
                     labelled_ratio=0.4)
    store = storage.Storage.for_data(cfg)
    res = plan_resampling(cfg, info, "train", store)
    lang = language_ratios({"aa": 4 / 3600, "bb": 12 / 3600}, 0.5)
    assert res.languages == pytest.approx(lang)
    p = (lang["aa"] + 9 * lang["bb"]) / (4 * lang["aa"] + 12 * lang["bb"])
    assert abs(p - 10 / 16) > 0.05
    assert res.labels == pytest.approx((0.4 / p, 0.6 / (1 - p)))
    assert balance_languages(cfg, info, "train", store) == res.languages  # the languages alone, unchanged

    expected = np.concatenate([resample_ratios(len(m.lengths), res, m.languages, m.labelled)
                               for m in shard_metadata(info, info.split("train"), store, languages=True,
                                                       transcripts=True)])  # (17,)
    usable = np.array([n >= 8000 for _, n, _ in rows])
    labelled = np.array([bool(t and t.strip()) for _, _, t in rows])
    assert expected[usable & labelled].sum() / expected[usable].sum() == pytest.approx(0.4)
    lang_only = np.array([lang[lg] for lg, _, _ in rows])
    assert expected[usable].sum() == pytest.approx(lang_only[usable].sum())  # an epoch keeps its rows

    # Without languages to balance, every row starts from one copy.
    mono = replace(cfg, language_alpha=1.0)
    assert plan_resampling(mono, info, "train", store).labels == pytest.approx((0.4 / (10 / 16), 0.6 / (6 / 16)))


def test_a_split_with_nothing_to_mix_is_an_error_naming_the_setting_and_the_data(tmp_path: Path) -> None:
    for name, text in (("none", None), ("blank", "  "), ("all", "every one")):
        root = tmp_path / name
        root.mkdir()
        info = _hand_dataset(root, [("aa", 16000, text)] * 4 + [("bb", 16000, text)] * 4)
        cfg = DataConfig(train_uri=str(root), min_sample_size=8000, max_sample_size=16000, labelled_ratio=0.5)
        store = storage.Storage.for_data(cfg)
        what = "no unlabelled utterance" if name == "all" else "no labelled utterance"
        with pytest.raises(ValueError, match=re.escape(f"data.labelled_ratio=0.5: the 'train' split of {root} has {what}")):
            plan_resampling(cfg, info, "train", store)
        assert plan_resampling(replace(cfg, labelled_ratio=0.0), info, "train", store).labels is None
    # A labelled row too short to train on does not count as one.
    root = tmp_path / "short"
    root.mkdir()
    info = _hand_dataset(root, [("aa", 16000, None)] * 4 + [("aa", 100, "too short")] * 2)
    cfg = DataConfig(train_uri=str(root), min_sample_size=8000, max_sample_size=16000, labelled_ratio=0.5)
    with pytest.raises(ValueError, match="no labelled utterance"):
        plan_resampling(cfg, info, "train", storage.Storage.for_data(cfg))


def test_an_unmixed_run_never_reads_the_transcripts(tmp_path: Path) -> None:
    """A manifest without a transcript column plans as before with ``labelled_ratio`` 0:
    the column is not read unless mixing needs it."""
    info = _hand_dataset(tmp_path, [("aa", 16000, None)] * 4 + [("bb", 32000, None)] * 4, transcripts=False)
    cfg = DataConfig(train_uri=str(tmp_path), min_sample_size=8000, max_sample_size=32000)
    store = storage.Storage.for_data(cfg)
    res = plan_resampling(cfg, info, "train", store)
    assert set(res.languages) == {"aa", "bb"} and res.labels is None
    assert [m.labelled for m in shard_metadata(info, info.split("train"), store, languages=True)] == [None, None]


def test_the_plan_hash_changes_with_the_ratio_and_not_without_it() -> None:
    base = _Settings(sample_rate=16000, spec=_spec(DataConfig()), normalize=False, shuffle_seed=0, seed=0,
                     num_splits=1)
    mixed = replace(base, labelled_ratio=0.5, label_weights=(2.5, 0.625))
    other = replace(base, labelled_ratio=0.3, label_weights=(1.5, 0.875))
    assert len({base.plan_hash(), mixed.plan_hash(), other.plan_hash()}) == 3
    # Unmixed, the hash is what it was before the setting existed: old positions stay valid.
    before = {"spec": asdict(base.spec), "shuffle_seed": 0, "num_splits": 1}
    assert base.plan_hash() == hashlib.sha1(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12]


# --- a prepared dataset: three languages of unequal size, 20% labelled -------------------------------

# Per language: files of 1 s and 2 s alternately, every fifth labelled (so labelled rows have the
# data's durations: 20% of its rows and of its hours), every other one unlabelled in one of three
# ways: an empty transcript, a blank one, or no sidecar row at all. cc has 4 more labelled files
# too short to train on, which must not count in p.
SIZES = {"aa": 10, "bb": 20, "cc": 40}
HOURS = {lang: 1.5 * n for lang, n in SIZES.items()}  # seconds, the unit does not matter
EPOCHS = 6
RATIO = 0.5


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> dict:
    from jobs.prepare import main

    raw = tmp_path_factory.mktemp("labelled") / "raw"
    sidecar = ["path\ttranscript"]
    i = 0
    files = [(lang, j, 1.0 if j % 2 == 0 else 2.0) for lang, n in SIZES.items() for j in range(n)]
    files += [("cc", 0, 0.25)] * 4
    for lang, j, seconds in files:
        rel = f"{lang}/u{i:03d}.wav"
        (raw / lang).mkdir(parents=True, exist_ok=True)
        (raw / rel).write_bytes(T.encode(T.tone(seconds, 16000, seed=i), 16000))
        if seconds < 0.5 or j % 5 == 0:
            sidecar.append(f"{rel}\tword {i}")
        elif j % 5 == 1:
            sidecar.append(f"{rel}\t")
        elif j % 5 == 2:
            sidecar.append(f"{rel}\t   ")
        i += 1
    (raw / S.SIDECAR_FILE).write_text("\n".join(sidecar) + "\n")
    out = raw.parent / "shards"
    assert main(["--input", str(raw), "--output", str(out), "--preset", "tiny", "--language", "folder",
                 "data.valid_fraction=0", "data.shard_size_mb=0.4"]) == 0
    manifest = pq.read_table(out / S.MANIFEST_FILE).to_pylist()
    cfg = replace(tiny().data, train_uri=str(out), batch_mode="pad", min_sample_size=8000, max_sample_size=32_000,
                  max_samples_per_batch=64_000, num_buckets=2, max_epochs=EPOCHS, shuffle_seed=5,
                  language_alpha=0.5, labelled_ratio=RATIO)
    return {"out": out, "manifest": manifest, "cfg": cfg}


def _planned(cfg: DataConfig, epochs: range) -> dict[int, Counter[str]]:
    """The ids the driver's resampling gives each epoch (the rows its batch counts come from),
    those too short to train on left out as planning leaves them out."""
    info = read_dataset_info(cfg.train_uri)
    store = storage.Storage.for_data(cfg)
    res = plan_resampling(cfg, info, "train", store)
    shards = info.split("train")
    metas = list(shard_metadata(info, shards, store, languages=True, transcripts=True))
    ids = [pq.read_table(Path(cfg.train_uri) / s.path, columns=[S.ID]).column(S.ID).to_pylist() for s in shards]
    out: dict[int, Counter[str]] = {}
    for epoch in epochs:
        seen: Counter[str] = Counter()
        for s, meta in enumerate(metas):
            ratios = resample_ratios(len(meta.lengths), res, meta.languages, meta.labelled)
            rows = unit_rows(ratios, cfg.shuffle_seed, epoch, s, len(meta.lengths))
            seen.update(ids[s][r] for r in rows.tolist() if meta.lengths[r] >= cfg.min_sample_size)
        out[epoch] = seen
    return out


def test_prepare_keeps_blank_and_missing_transcripts_unlabelled(mixed: dict) -> None:
    manifest = mixed["manifest"]
    assert len(manifest) == sum(SIZES.values()) + 4
    labelled = labelled_rows(pa.array([m[S.TRANSCRIPT] for m in manifest], pa.string()))
    assert labelled.sum() == sum(SIZES.values()) // 5 + 4
    assert {m[S.TRANSCRIPT] for m, lab in zip(manifest, labelled, strict=True) if not lab} == {None, "", "   "}


def test_a_long_stream_mixes_labelled_rows_at_the_ratio_and_keeps_language_shares(mixed: dict) -> None:
    """2000 epochs of the driver's resampling of the prepared data (20% of the usable rows
    labelled, 3 languages of 15, 30 and 60 s): the labelled share of the rows is within
    0.01 of r = 0.5, each language's share of the seconds within 0.01 of hours^0.5 / sum,
    and an epoch holds 70 rows (the usable count) and 105 s on average, within 1%. Each
    tolerance is more than 4 standard deviations of the rounding's noise (computed below);
    the data's own shares (0.2; 0.14, 0.29, 0.57) are far outside them."""
    cfg = mixed["cfg"]
    info = read_dataset_info(cfg.train_uri)
    store = storage.Storage.for_data(cfg)
    res = plan_resampling(cfg, info, "train", store)
    metas = list(shard_metadata(info, info.split("train"), store, languages=True, transcripts=True))
    epochs = 2000
    rows_seen = labelled_seen = 0
    seconds: Counter[str] = Counter()
    var_rows = var_seconds = 0.0
    for s, meta in enumerate(metas):
        ratios = resample_ratios(len(meta.lengths), res, meta.languages, meta.labelled)  # (N,)
        usable = meta.lengths >= cfg.min_sample_size
        frac = ratios - np.floor(ratios)
        var_rows += epochs * float((frac * (1 - frac))[usable].sum())
        var_seconds += epochs * float(((meta.lengths / 16000) ** 2 * frac * (1 - frac))[usable].sum())
        langs = np.asarray(meta.languages.to_pylist())
        for epoch in range(epochs):
            rows = unit_rows(ratios, cfg.shuffle_seed, epoch, s, len(meta.lengths))
            rows = rows[usable[rows]]
            rows_seen += len(rows)
            labelled_seen += int(meta.labelled[rows].sum())
            for lang in SIZES:
                seconds[lang] += float(meta.lengths[rows][langs[rows] == lang].sum()) / 16000
    total = sum(seconds.values())
    assert 4 * np.sqrt(var_rows) / rows_seen < 0.01 and 4 * np.sqrt(var_seconds) / total < 0.01
    assert labelled_seen / rows_seen == pytest.approx(RATIO, abs=0.01)
    for lang, h in HOURS.items():
        target = h**0.5 / sum(v**0.5 for v in HOURS.values())
        assert seconds[lang] / total == pytest.approx(target, abs=0.01), (lang, seconds[lang] / total, target)
    assert rows_seen / epochs == pytest.approx(sum(SIZES.values()), rel=0.01)
    assert total / epochs == pytest.approx(sum(HOURS.values()), rel=0.01)


def test_the_stream_delivers_the_counted_rows_and_resumes_exactly(mixed: dict) -> None:
    """6 epochs read by two workers deliver, epoch by epoch, exactly the ids the driver's
    resampling drew (the read tasks plan from the same rows the batch counts came from),
    about half of them labelled (within 0.1: over 420 rows the rounding's noise is under
    0.02 in standard deviation; unmixed it would be 0.2). Stopped after 3 batches per
    worker and resumed from its merged position, the stream delivers exactly the
    uninterrupted stream's batches; resumed under another ratio, the plan no longer
    matches and unfinished shards are read again from their start, as for any change of
    the batching settings."""
    cfg = mixed["cfg"]
    labelled = {m[S.ID]: bool(m[S.TRANSCRIPT] and m[S.TRANSCRIPT].strip()) for m in mixed["manifest"]}
    whole = [b for r in T.drain_two_workers(cfg) for b in r["batches"]]
    delivered: dict[int, Counter[str]] = {e: Counter() for e in range(EPOCHS)}
    for b in whole:
        delivered[b["key"][0]].update(b["ids"])
    assert delivered == _planned(cfg, range(EPOCHS))
    ids = [u for b in whole for u in b["ids"]]
    assert sum(labelled[u] for u in ids) / len(ids) == pytest.approx(RATIO, abs=0.1)

    first = T.drain_two_workers(cfg, max_batches=3)
    position = DataPosition.merge([r["position"] for r in first])
    assert position["epochs_done"] == 0
    rest = T.drain_two_workers(cfg, position=position)
    assert len(rest[0]["batches"]) == len(rest[1]["batches"])
    resumed = [b for r in first + rest for b in r["batches"]]
    assert len(resumed) == len(whole)
    assert {b["key"]: b["ids"] for b in resumed} == {b["key"]: b["ids"] for b in whole}

    with pytest.warns(UserWarning, match="batching settings changed"):
        build_train_dataset(replace(cfg, labelled_ratio=0.3), position=position, num_splits=2)
