"""Languages: where prepared data gets its ``language`` column, and XLSR's balancing of the
training stream by it (p(language) proportional to hours^alpha), exactly resumable.

The balancing is checked twice: on the resampling alone over a long stream (thousands of
epochs, a tight tolerance derived from its variance), and end to end through
``jobs.prepare`` and the Ray Data training input read by two workers, where a stream stopped
mid-epoch and resumed from its merged position delivers exactly the batches the
uninterrupted stream did.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataConfig, tiny
from pipeline.data import schema as S
from pipeline.data import storage
from pipeline.data import testing as T
from pipeline.data.batching import language_ratios, resample_rows
from pipeline.data.loader import (
    DatasetInfo,
    _PlannedCounts,
    _spec,
    balance_languages,
    dataset_languages,
    plan_units,
    read_dataset_info,
    row_ratios,
)
from pipeline.data.position import DataPosition
from pipeline.data.prepare import language_column, language_of
from pipeline.data.sidecar import parse_sidecar

# --- where a file's language comes from -----------------------------------------------------------


def test_the_sidecar_row_wins_over_the_folder_and_the_folder_over_the_flag() -> None:
    assert language_of("sw/a/u1.wav", "yo", "folder") == "yo"
    assert language_of("sw/a/u1.wav", None, "folder") == "sw"
    assert language_of("u1.wav", None, "folder") is None  # no folder to name it
    assert language_of("sw/u1.wav", None, "en") == "en"
    assert language_of("sw/u1.wav", None, "") is None


def test_the_plan_gives_every_file_the_language_the_rule_gives_one_file() -> None:
    """prepare builds its plan from Arrow columns (no Python object per file at 10^7 files):
    the column rule must be :func:`language_of`, file by file, chunked columns included."""
    rels = pa.chunked_array([["sw/a/u1.wav", "u1.wav", "/x.wav", "en/b.wav"], ["yo/c.wav", "xx/d.wav"]])
    given = pa.chunked_array([["yo", None, None, ""], [None, "aa"]], pa.string())
    for flag in ("folder", "en", ""):
        want = [language_of(r, g, flag) for r, g in zip(rels.to_pylist(), given.to_pylist(), strict=True)]
        assert language_column(rels, given, flag).to_pylist() == want, flag
    assert language_column(rels, pa.nulls(6, pa.string()), "folder").to_pylist() == \
        ["sw", None, None, "en", "yo", "xx"]


def test_each_row_gets_its_languages_ratio_and_an_unnamed_language_none() -> None:
    ratios = {"": 0.5, "aa": 2.0, "bb": 0.25}
    got = row_ratios(pa.array(["bb", None, "aa", "zz", ""], pa.string()), ratios)
    assert got.tolist() == [0.25, 0.5, 2.0, 0.0, 0.5]


def test_a_sidecar_may_carry_only_a_language_column_and_empty_cells_name_none() -> None:
    car = parse_sidecar(b"path,language\r\nsw/u1.wav, yo \r\nsw/u2.wav,\r\n", "s.csv")
    assert car.labels["sw/u1.wav"].language == "yo"
    assert car.labels["sw/u2.wav"].language is None
    assert car.labels["sw/u1.wav"].transcript is None
    with pytest.raises(ValueError, match="'language'"):
        parse_sidecar(b"path\tnotes\nu.wav\tx\n", "s.tsv")


def test_only_a_split_of_two_languages_or_more_has_languages_to_carry() -> None:
    def info(**splits: dict) -> DatasetInfo:
        return DatasetInfo(root="x", version="v", sample_rate=16000, shards=(),
                           summary={"splits": {k: {"languages": v} for k, v in splits.items()}})

    assert dataset_languages(info(train={"sw": {}, "": {}, "en": {}})) == ("", "en", "sw")
    assert dataset_languages(info(train={"sw": {}}, valid={"sw": {}, "en": {}})) == ()
    assert dataset_languages(info(train={"sw": {}}, valid={"sw": {}, "en": {}}), "valid") == ("en", "sw")
    assert dataset_languages(DatasetInfo(root="x", version="v", sample_rate=16000, shards=(), summary={})) == ()


def test_data_language_alpha_is_checked() -> None:
    with pytest.raises(ValueError, match="data.language_alpha"):
        DataConfig(language_alpha=1.5)
    with pytest.raises(ValueError, match="data.prepare_language"):
        DataConfig(prepare_language=" en")


# --- the resampling alone ------------------------------------------------------------------------


def test_language_ratios_by_hand() -> None:
    # 1, 3 and 9 hours, alpha 0.5: p = (1, sqrt 3, 3) / (4 + sqrt 3); copies = p * 13 / hours
    ratios = language_ratios({"aa": 1.0, "bb": 3.0, "cc": 9.0}, 0.5)
    z = 4 + np.sqrt(3)
    assert ratios == pytest.approx({"aa": 13 / z, "bb": 13 * np.sqrt(3) / (3 * z), "cc": 13 * 3 / (9 * z)})
    assert language_ratios({"aa": 1.0, "bb": 3.0}, 0.0) == pytest.approx({"aa": 2.0, "bb": 2 / 3})  # uniform
    assert language_ratios({"aa": 1.0, "bb": 3.0}, 1.0) == {}  # as the data is
    assert language_ratios({"aa": 5.0, "bb": 0.0}, 0.5) == {}  # one language with hours


def test_a_long_stream_of_resampled_epochs_gives_each_language_hours_to_the_alpha() -> None:
    """3 languages of 6, 12 and 54 seconds (utterances of 1, 2 and 1 s, so counts are not
    hours): over 4000 epochs each language's share of the hours is within 0.004 of
    hours^0.5 / sum (more than 4 standard deviations of the rounding's noise, computed
    below), and far from the shares of the data as it is."""
    durations = np.array([1.0] * 6 + [2.0] * 6 + [1.0] * 54)
    langs = np.array(["aa"] * 6 + ["bb"] * 6 + ["cc"] * 54)
    hours = {lang: float(durations[langs == lang].sum()) for lang in ("aa", "bb", "cc")}
    target = {lang: h**0.5 / sum(v**0.5 for v in hours.values()) for lang, h in hours.items()}
    ratios = language_ratios(hours, 0.5)
    row_ratios = np.array([ratios[lang] for lang in langs])
    epochs = 4000
    got = Counter()
    for epoch in range(epochs):
        rows = resample_rows(row_ratios, np.random.default_rng([epoch, 0, 1]))
        for lang in ("aa", "bb", "cc"):
            got[lang] += float(durations[rows][langs[rows] == lang].sum())
    total = sum(got.values())
    frac = row_ratios - np.floor(row_ratios)
    for lang in ("aa", "bb", "cc"):
        sd = np.sqrt(epochs * (durations[langs == lang] ** 2 * frac[langs == lang] * (1 - frac[langs == lang])).sum())
        assert 4 * sd / total < 0.004
        assert got[lang] / total == pytest.approx(target[lang], abs=0.004), (lang, got[lang] / total, target)
    assert abs(got["cc"] / total - 54 / 72) > 0.15  # the natural share would fail


def test_resampling_keeps_every_row_of_an_upsampled_language() -> None:
    rows = resample_rows(np.array([2.5, 2.5, 0.25, 1.0]), np.random.default_rng(0))
    counts = np.bincount(rows, minlength=4)
    assert counts[0] in (2, 3) and counts[1] in (2, 3) and counts[2] in (0, 1) and counts[3] == 1
    assert (np.diff(rows) >= 0).all()


# --- end to end: prepare, then the training input on Ray -----------------------------------------

# aa: 4 files of 1 s in aa/ and 2 in xx/ that the sidecar says are aa; bb: 6 of 2 s; cc: 54 of 1 s.
CORPUS = [("aa", "aa", 1.0)] * 4 + [("xx", "aa", 1.0)] * 2 + [("bb", "bb", 2.0)] * 6 + [("cc", "cc", 1.0)] * 54
EPOCHS = 16


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> dict:
    from jobs.prepare import main

    raw = tmp_path_factory.mktemp("languages") / "raw"
    rows = ["path\tlanguage"]
    for i, (folder, lang, seconds) in enumerate(CORPUS):
        (raw / folder).mkdir(parents=True, exist_ok=True)
        (raw / folder / f"u{i:03d}.wav").write_bytes(T.encode(T.tone(seconds, 16000, seed=i), 16000))
        if folder != lang:
            rows.append(f"{folder}/u{i:03d}.wav\t{lang}")
    (raw / S.SIDECAR_FILE).write_text("\n".join(rows) + "\n")
    out = raw.parent / "shards"
    assert main(["--input", str(raw), "--output", str(out), "--preset", "tiny", "--language", "folder",
                 "data.valid_fraction=0", "data.shard_size_mb=0.25"]) == 0
    manifest = pq.read_table(out / S.MANIFEST_FILE).to_pylist()
    summary = json.loads((out / S.SUMMARY_FILE).read_text())
    cfg = replace(tiny().data, train_uri=str(out), batch_mode="pad", min_sample_size=0, max_sample_size=48_000,
                  max_samples_per_batch=96_000, num_buckets=2, max_epochs=EPOCHS, shuffle_seed=3)
    return {"out": out, "manifest": manifest, "summary": summary, "cfg": cfg}


def test_prepare_writes_each_files_language_to_manifest_shards_and_summary(multilingual: dict) -> None:
    out, manifest = multilingual["out"], multilingual["manifest"]
    assert len(manifest) == len(CORPUS)
    for m in manifest:
        i = int(m[S.ID].rsplit("/u", 1)[1])
        assert m[S.LANGUAGE] == CORPUS[i][1], m[S.ID]
    shards = read_dataset_info(str(out)).split("train")
    assert len(shards) >= 3  # several units, each a mix of languages
    in_shards = {r[S.ID]: r[S.LANGUAGE] for s in shards
                 for r in pq.read_table(out / s.path, columns=[S.ID, S.LANGUAGE]).to_pylist()}
    assert in_shards == {m[S.ID]: m[S.LANGUAGE] for m in manifest}
    by_language = multilingual["summary"]["splits"]["train"]["languages"]
    assert {k: round(v["hours"] * 3600) for k, v in by_language.items()} == {"aa": 6, "bb": 12, "cc": 54}


def test_the_stream_balances_languages_to_hours_to_the_alpha_and_resumes_exactly(multilingual: dict) -> None:
    """16 epochs read by two workers: each language's share of the delivered seconds is
    within 0.04 of hours^0.5 / sum (the rounding's noise over 16 epochs is at most 0.011 in
    standard deviation, for cc; the data's own shares are 0.09 to 0.2 away). A stream stopped after
    3 batches per worker and resumed from its merged position delivers exactly the
    uninterrupted stream's batches: same keys, same utterances in each, none twice."""
    cfg = multilingual["cfg"]
    language = {m[S.ID]: m[S.LANGUAGE] for m in multilingual["manifest"]}
    whole = [b for r in T.drain_two_workers(cfg) for b in r["batches"]]
    seconds: Counter[str] = Counter()
    for b in whole:
        for utt, n in zip(b["ids"], b["num_samples"], strict=True):
            seconds[language[utt]] += n / 16000
    total = sum(seconds.values())
    hours = {"aa": 6.0, "bb": 12.0, "cc": 54.0}
    for lang, h in hours.items():
        target = h**0.5 / sum(v**0.5 for v in hours.values())
        assert seconds[lang] / total == pytest.approx(target, abs=0.04), (lang, seconds[lang] / total, target)
    assert total == pytest.approx(EPOCHS * 72, rel=0.05)  # an epoch keeps the data's hours
    assert {b["key"][0] for b in whole} == set(range(EPOCHS))
    # Every batch carries each utterance's language to the step (the per-language losses).
    assert all(b["languages"] == [language[u] for u in b["ids"]] for b in whole)

    first = T.drain_two_workers(cfg, max_batches=3)
    position = DataPosition.merge([r["position"] for r in first])
    assert position["epochs_done"] == 0
    rest = T.drain_two_workers(cfg, position=position)
    assert len(rest[0]["batches"]) == len(rest[1]["batches"])
    resumed = [b for r in first + rest for b in r["batches"]]
    assert len(resumed) == len(whole)
    assert {b["key"]: b["ids"] for b in resumed} == {b["key"]: b["ids"] for b in whole}
    assert DataPosition.merge([position] + [r["position"] for r in rest])["epochs_done"] == EPOCHS


def test_a_balanced_run_counts_only_the_epochs_it_will_read(multilingual: dict) -> None:
    """Resampled epochs each have their own batch counts; a run that will read a little over
    one epoch (``max_batches``, as the trainer passes it) plans two epochs and counts a
    window of epochs near that, not all 16 of ``data.max_epochs``, and what it counted equals
    what counting every epoch gives."""
    cfg = multilingual["cfg"]
    info = read_dataset_info(str(multilingual["out"]))
    store = storage.Storage.for_data(cfg)
    ratios = balance_languages(cfg, info, "train", store)
    assert set(ratios) == {"aa", "bb", "cc"}
    every = _PlannedCounts(cfg, info, "train", 2, _spec(cfg), store, ratios=ratios)
    totals = [sum(every(e).batches) for e in range(cfg.max_epochs)]
    assert all(t % 2 == 0 for t in totals)  # a multiple of the workers, epoch by epoch
    wanted = totals[0] + 1
    counts = _PlannedCounts(cfg, info, "train", 2, _spec(cfg), store, ratios=ratios, max_batches=wanted)
    tasks = plan_units(len(info.split("train")), max_epochs=cfg.max_epochs, shuffle_seed=cfg.shuffle_seed,
                       position=DataPosition(None), per_task=1, counts=counts, max_batches=wanted)
    assert {unit[0] for task in tasks for unit in task} == {0, 1}
    assert set(counts.counted) <= set(range(4))
    assert all(counts(e) == every(e) for e in counts.counted)


def test_alpha_one_reads_the_data_as_it_is(multilingual: dict) -> None:
    cfg = replace(multilingual["cfg"], language_alpha=1.0, max_epochs=1)
    batches = [b for r in T.drain_two_workers(cfg) for b in r["batches"]]
    seen = Counter(i for b in batches for i in b["ids"])
    assert seen == Counter(m[S.ID] for m in multilingual["manifest"])
    language = {m[S.ID]: m[S.LANGUAGE] for m in multilingual["manifest"]}
    assert all(b["languages"] == [language[u] for u in b["ids"]] for b in batches), "unbalanced, still carried"


# --- end to end: a pretraining run on the three languages ------------------------------------------


def test_pretraining_on_three_languages_logs_each_languages_loss_to_mlflow(multilingual: dict, tmp_path) -> None:
    """Ray Train + DeepSpeed (2 workers, ZeRO-2) on the prepared data, 2 updates logged each:
    MLflow has ``loss/lang/<code>`` and ``lang_share/<code>`` for aa, bb and cc at every logged
    step, reduced over both ranks, and the shares weight the languages' losses back into
    ``loss/contrastive``."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import apply_overrides
    from pipeline.train.trainer import run_pretraining

    cfg = apply_overrides(tiny(), [
        f"data.train_uri={multilingual['out']}", f"checkpoint.storage_path={tmp_path / 'runs'}",
        "checkpoint.run_name=langs", "train.max_steps=2", "train.log_every=1", "checkpoint.every_steps=2",
        "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "deepspeed.zero_stage=2", "data.decode_cpus=0.5",
        "data.max_samples_per_batch=64000", "data.max_sample_size=32000", "schedule.warmup_steps=0",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ])
    result = run_pretraining(cfg)
    assert result.step == 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    metrics = {key: {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, key)}
               for key in ("loss/contrastive", *(f"{k}/{lang}" for k in ("loss/lang", "lang_share")
                                                  for lang in ("aa", "bb", "cc")))}
    for step in (1, 2):
        shares = {lang: metrics[f"lang_share/{lang}"][step] for lang in ("aa", "bb", "cc")}
        assert sum(shares.values()) == pytest.approx(1.0)
        seen = [lang for lang, share in shares.items() if share > 0]
        assert seen, step
        weighted = sum(shares[lang] * metrics[f"loss/lang/{lang}"][step] for lang in seen)
        assert weighted == pytest.approx(metrics["loss/contrastive"][step], rel=1e-4)
    assert all(np.isfinite(metrics[f"loss/lang/{lang}"][s]) for lang in ("aa", "bb", "cc") for s in (1, 2)
               if metrics[f"lang_share/{lang}"][s] > 0)
