"""The data path end to end against the real local S3 store and a real Ray instance.

A generated corpus (clean files at many rates and channel counts, plus one file of
every bad-input class) is prepared from s3:// to s3://, then read back through the
training input by two consumers of ``streaming_split(2, equal=True)``, each in its own
Ray worker process as under Ray Train. The hostile corpus (:mod:`pipeline.data.hostile`)
is prepared from a local directory (with links, a pipe and names that are not UTF-8)
and from s3://, and every path checked. One Ray instance serves the whole module.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from fixtures.objectstore import S3Store

from pipeline.config import tiny
from pipeline.data import hostile as H
from pipeline.data import schema as S
from pipeline.data import storage
from pipeline.data import testing as T
from pipeline.data import verdicts as V
from pipeline.data.loader import build_train_dataset, read_dataset_info
from pipeline.data.position import DataPosition
from pipeline.data.prepare import prepare, split_of

pytestmark = pytest.mark.e2e

RATES = [(16000, 1), (22050, 1), (44100, 2), (8000, 1), (48000, 2)]
BAD = T.bad_inputs()


def _clean_corpus() -> dict[str, tuple[bytes, int]]:
    """rel path -> (file bytes, expected samples at 16 kHz)."""
    rng = np.random.default_rng(0)
    out = {}
    for i in range(36):
        rate, channels = RATES[i % len(RATES)]
        seconds = float(rng.choice([0.4, 0.8, 1.0, 1.5, 2.0, 3.0]))
        audio = T.tone(seconds, rate, channels=channels, freq=float(200 + 10 * i), seed=i)
        fmt, ext = ("FLAC", "flac") if i % 3 == 0 else ("WAV", "wav")
        out[f"spk{i % 4}/utt{i:03d}.{ext}"] = (T.encode(audio, rate, fmt), int(round(seconds * 16000)))
    return out


@pytest.fixture(scope="module")
def prepared(s3_store: S3Store, ray_local: None) -> dict:
    clean = _clean_corpus()
    raw = s3_store.uri("e2e", "raw")
    for rel, (data, _) in clean.items():
        storage.write_bytes(f"{raw}/{rel}", data)
    for case in BAD:
        storage.write_bytes(f"{raw}/bad/{case.name}{case.ext}", case.data)
    sidecar = ["path\ttranscript\tspeaker"] + [f"{rel}\ttone number {i}\t{rel.split('/')[0]}"
                                               for i, rel in enumerate(sorted(clean))]
    storage.write_bytes(f"{raw}/{S.SIDECAR_FILE}", ("\n".join(sidecar) + "\n").encode())
    cfg = replace(tiny().data, shard_size_mb=0.15, valid_fraction=0.2, prepare_min_seconds=0.1)
    out = s3_store.uri("e2e", "prepared")
    summary = prepare(raw, out, cfg, progress=lambda _: None)
    manifest = storage.read_table(storage.join(out, S.MANIFEST_FILE)).to_pylist()
    return {"raw": raw, "out": out, "clean": clean, "summary": summary, "manifest": manifest, "cfg": cfg}


def test_prepare_accounts_for_every_file(prepared: dict) -> None:
    summary, manifest, out = prepared["summary"], prepared["manifest"], prepared["out"]
    files_in = len(prepared["clean"]) + len(BAD)
    assert summary["files_in"] == files_in
    assert summary["accepted"] + summary["rejected"] == files_in
    rejects = {r[S.SOURCE_URI].rsplit("/", 1)[1]: r
               for r in storage.read_table(storage.join(out, S.REJECTS_FILE)).to_pylist()}
    by_name = {m[S.SOURCE_URI].rsplit("/", 1)[1]: m for m in manifest}
    assert len(rejects) + len(by_name) == files_in and not set(rejects) & set(by_name)
    for case in BAD:
        name = case.name + case.ext
        if case.accepted:
            m = by_name[name]
            assert m[S.SAMPLE_RATE] == 16000 and m[S.NUM_SAMPLES] == case.num_samples, m
            row = storage.read_table(storage.join(out, m[S.SHARD])).slice(m[S.ROW], 1).to_pylist()[0]
            assert row[S.ID] == m[S.ID]
            audio, rate = sf.read(io.BytesIO(row[S.AUDIO]), dtype="float32")
            assert rate == 16000 and audio.ndim == 1 and len(audio) == case.num_samples
            assert T.dominant_frequency(audio, rate) == pytest.approx(case.freq, abs=3)
        else:
            assert rejects[name][S.REASON] in case.reasons, rejects[name]
    assert sum(summary["rejected_by_reason"].values()) == summary["rejected"]
    assert summary["shards"] and summary["splits"]["valid"]["utterances"] > 0
    for rel, (_, samples) in prepared["clean"].items():
        m = next(x for x in manifest if x[S.SOURCE_URI].endswith("/" + rel))
        assert m[S.NUM_SAMPLES] == samples and m[S.SPEAKER] == rel.split("/")[0]
        assert m[S.TRANSCRIPT].startswith("tone number ")
        assert m[S.SPLIT] == split_of(m[S.ID], 0.2)


def _train(prepared: dict) -> dict[str, dict]:
    return {m[S.ID]: m for m in prepared["manifest"] if m[S.SPLIT] == "train"}


def test_two_workers_see_the_train_split_once_per_epoch_with_true_samples(prepared: dict) -> None:
    # pad mode, no crop: every utterance whole, so counts and content can be checked.
    cfg = replace(prepared["cfg"], train_uri=prepared["out"], batch_mode="pad", max_epochs=1,
                  min_sample_size=0, max_sample_size=64_000, max_samples_per_batch=128_000, num_buckets=3)
    ranks = T.drain_two_workers(cfg)
    batches = [b for r in ranks for b in r["batches"]]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) > 0
    ids = Counter(i for b in batches for i in b["ids"])
    train = _train(prepared)
    assert set(ids) == set(train) and max(ids.values()) == 1
    decoded = {}
    for shard in read_dataset_info(prepared["out"]).split("train"):
        for row in storage.read_table(storage.join(prepared["out"], shard.path), [S.ID, S.AUDIO]).to_pylist():
            decoded[row[S.ID]] = sf.read(io.BytesIO(row[S.AUDIO]), dtype="float32")[0]
    for b in batches:
        assert b["mask_ok"] and b["width"] == max(b["num_samples"]) and len(b["ids"]) * b["width"] <= 128_000
        assert b["languages"] is None, "a monolingual split carries no languages"
        for utt, n, total in zip(b["ids"], b["num_samples"], b["sums"], strict=True):
            assert n == train[utt][S.NUM_SAMPLES] == len(decoded[utt])
            assert total == pytest.approx(float(decoded[utt].sum(dtype=np.float64)), abs=1e-6)
    merged = DataPosition.merge([r["position"] for r in ranks])
    assert merged["epochs_done"] == 1 and not merged["partial"]


def test_crop_mode_batches_fit_the_budget_without_padding(prepared: dict) -> None:
    cfg = replace(prepared["cfg"], train_uri=prepared["out"], batch_mode="crop", max_epochs=1,
                  min_sample_size=8_000, max_sample_size=16_000, max_samples_per_batch=48_000, normalize=True)
    ranks = T.drain_two_workers(cfg)
    batches = [b for r in ranks for b in r["batches"]]
    train = _train(prepared)
    assert Counter(i for b in batches for i in b["ids"]) == Counter(
        u for u, m in train.items() if m[S.NUM_SAMPLES] >= 8_000
    )
    for b in batches:
        assert not b["padded"] and b["width"] <= 16_000 and len(b["ids"]) * b["width"] <= 48_000
        assert all(n == b["width"] for n in b["num_samples"])
        assert all(abs(s) < 1e-2 * b["width"] for s in b["sums"])  # normalised: mean about 0


def test_resume_after_a_mid_epoch_stop_skips_nothing_and_repeats_nothing(prepared: dict) -> None:
    cfg = replace(prepared["cfg"], train_uri=prepared["out"], batch_mode="pad", max_epochs=2,
                  min_sample_size=0, max_sample_size=64_000, max_samples_per_batch=64_000, shuffle_seed=5)
    first = T.drain_two_workers(cfg, max_batches=4)  # both ranks stop after 4 batches, as at a checkpoint
    position = DataPosition.merge([r["position"] for r in first])
    assert position["epochs_done"] == 0 and (position["partial"] or position["done"])
    rest = T.drain_two_workers(cfg, position=position)
    assert len(rest[0]["batches"]) == len(rest[1]["batches"])
    before = [b for r in first for b in r["batches"]]
    after = [b for r in rest for b in r["batches"]]
    assert not {b["key"] for b in before} & {b["key"] for b in after}
    train = set(_train(prepared))
    for epoch in (0, 1):
        seen = Counter(i for b in before + after if b["key"][0] == epoch for i in b["ids"])
        assert set(seen) == train and max(seen.values()) == 1, f"epoch {epoch}"
    final = DataPosition.merge([position] + [r["position"] for r in rest])
    assert final["epochs_done"] == 2


def test_a_position_from_other_data_is_refused(prepared: dict) -> None:
    cfg = replace(prepared["cfg"], train_uri=prepared["out"])
    info = read_dataset_info(prepared["out"])
    n = len(info.split("train"))
    state = {"version": 1, "plan": f"{info.version}/train/000000000000", "num_shards": n, "epochs_done": 0,
             "done": {"0": [1]}, "partial": {"0/0": {"num_batches": 3, "seen": [0]}}}
    with pytest.raises(ValueError, match="different data"):
        build_train_dataset(cfg, position=dict(state, plan="0123456789ab/train/000000000000"))
    with pytest.raises(ValueError, match="different data"):
        build_train_dataset(cfg, position=dict(state, num_shards=n + 1))
    with pytest.warns(UserWarning, match="batching settings changed"):
        build_train_dataset(cfg, position=state)


def test_rerun_does_not_duplicate_and_local_paths_work(tmp_path: Path, ray_local: None) -> None:
    from jobs.prepare import main

    raw = tmp_path / "raw"
    for i in range(6):
        (raw / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (raw / f"d{i % 2}" / f"a{i}.wav").write_bytes(T.encode(T.tone(1.0 + i / 4, 16000, seed=i), 16000))
    out = tmp_path / "out"
    args = ["--input", str(raw), "--output", str(out), "--preset", "tiny", "data.shard_size_mb=0.03",
            "data.valid_fraction=0.0"]
    assert main(args) == 0
    first = storage.read_json(str(out / S.SUMMARY_FILE))
    assert main(args) == 0  # same input: nothing to do
    assert storage.read_json(str(out / S.SUMMARY_FILE)) == first
    assert main(args + ["--force"]) == 0
    (raw / "d0" / "new.wav").write_bytes(T.encode(T.tone(1.0, 16000), 16000))
    assert main(args) == 0
    second = storage.read_json(str(out / S.SUMMARY_FILE))
    assert second["version"] != first["version"] and second["accepted"] == first["accepted"] + 1
    assert [p.name for p in (out / S.SHARDS_DIR).iterdir()] == [second["version"]]
    ids = pq.read_table(out / S.MANIFEST_FILE).column(S.ID).to_pylist()
    assert len(ids) == len(set(ids)) == 7
    rows = sum(pq.read_metadata(out / s["path"]).num_rows for s in second["shards"])
    assert rows == 7
    assert main(["--input", str(tmp_path / "missing"), "--output", str(out)]) == 1


def test_data_benchmark_measures_both_paths(prepared: dict) -> None:
    from jobs.benchmarks.data import format_rows, measure_input, measure_plain, whole_config

    plain = measure_plain(prepared["out"])
    ray_row = measure_input(prepared["out"], whole_config(1), label="input (whole)", cpus=2)
    # the same audio through both paths
    assert plain.audio_s == pytest.approx(ray_row.audio_s) and plain.audio_s > 0
    assert plain.per_cpu_second > 0 and ray_row.cpu_s > 0 and "decode" in (ray_row.cpu_roles or {})
    table = format_rows([plain, ray_row])
    assert "plain soundfile" in table and "input (whole)" in table and "x" in table


def test_scale_benchmark_measures_every_stage_and_fits_the_growth(s3_store: S3Store, ray_local: None) -> None:
    """``jobs.bench scale`` at 40 and 80 files on the session's store and Ray: every stage is
    measured and the table fits an exponent where the figures are above the noise floor."""
    import argparse

    from jobs.benchmarks import scale

    s3 = storage.Storage.from_config(s3_store.endpoint)
    args = argparse.Namespace(files_per_shard=10, workers=2, epochs=2)
    results = []
    meter = scale.Meter()
    try:
        for n in (40, 80):
            scale.write_corpus(n, s3, threads=4)
            results.append(scale.measure(n, args, s3, meter))
    finally:
        meter.close()
    for r in results:
        assert set(r.stages) == set(scale.STAGES) and r.shards >= 2
        assert all(m.wall_s > 0 for m in r.stages.values()), r.stages
        assert r.position_kb > 0
    text, rows = scale.table(results)
    assert "exponent" in text and {row["stage"] for row in rows} == set(scale.STAGES)
    assert any(row["exponent"] is not None for row in rows)


def test_valid_speakers_hold_out_whole_voices(tmp_path: Path, ray_local: None) -> None:
    """``data.valid_speakers``: every utterance of the named speakers, and nothing else (with
    ``valid_fraction`` 0), lands in the valid split; a name with no utterances is an error
    that lists the speakers there are, before anything is converted."""
    from jobs.prepare import main

    raw = tmp_path / "raw"
    rows = ["path\ttranscript\tspeaker"]
    for i in range(9):
        spk = f"voice{i % 3}"
        (raw / spk).mkdir(parents=True, exist_ok=True)
        (raw / spk / f"u{i}.wav").write_bytes(T.encode(T.tone(0.5 + i / 8, 16000, seed=i), 16000))
        rows.append(f"{spk}/u{i}.wav\tline {i}\t{spk}")
    (raw / S.SIDECAR_FILE).write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    base = ["--input", str(raw), "--output", str(out), "--preset", "tiny", "data.shard_size_mb=0.03",
            "data.valid_fraction=0.0"]
    assert main(base + ["data.valid_speakers=[voice1]"]) == 0
    manifest = pq.read_table(out / S.MANIFEST_FILE).to_pylist()
    assert len(manifest) == 9
    for m in manifest:
        assert m[S.SPLIT] == ("valid" if m[S.SPEAKER] == "voice1" else "train"), m

    bad = tmp_path / "bad"
    with pytest.raises(ValueError, match=r"no utterances of \['voice9'\].*voice0, voice1, voice2"):
        prepare(str(raw), str(bad), replace(tiny().data, valid_fraction=0.0, valid_speakers=["voice9"]),
                progress=lambda _: None)
    assert not bad.exists()


# --- the hostile corpus, on disk and on S3 ----------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What must become of one listed path."""

    reasons: frozenset[str] = frozenset()
    num_samples: int = 0
    tolerance: int = 0
    freq: float = 0.0
    min_rms: float = 0.1
    id: str | None = None
    transcript: str | None = None


def _write_hostile(write: Callable[[str, bytes], None]) -> dict[str, Expected]:
    """The store-independent part of the corpus; rel path -> what must become of it."""
    expected = {}
    for case in H.audio_cases():
        rel = f"audio/{case.name}{case.ext}"
        write(rel, case.data)
        expected[rel] = Expected(case.reasons, case.num_samples, case.length_tolerance, case.freq, case.min_rms,
                                 id=None if case.reasons else f"audio/{case.name}")
    for named in H.name_cases():
        write(named.rel, named.data)
        if named.id is not None:
            expected[named.rel] = Expected(num_samples=8000, id=named.id, transcript=named.transcript)
    write(S.SIDECAR_FILE, H.name_sidecar())
    return expected


def _check_hostile(raw: str, out: str, summary: dict, expected: dict[str, Expected]) -> None:
    """Every path exactly once in the manifest or the rejects, with its verdict; accepted ones
    with their id, transcript, length and signal in the shards; the summary's counts."""
    manifest = storage.read_table(storage.join(out, S.MANIFEST_FILE)).to_pylist()
    rejects = storage.read_table(storage.join(out, S.REJECTS_FILE)).to_pylist()
    prefix = raw.rstrip("/") + "/"
    seen = Counter(r[S.SOURCE_URI].removeprefix(prefix) for r in manifest + rejects)
    assert seen == Counter(expected.keys()), set(seen) ^ set(expected)
    assert summary["files_in"] == len(expected) and summary["accepted"] == len(manifest)
    for r in rejects:
        rel = r[S.SOURCE_URI].removeprefix(prefix)
        assert r[S.REASON] in expected[rel].reasons, (rel, r)
    rows: dict[str, dict] = {}
    for shard in {m[S.SHARD] for m in manifest}:
        for row in storage.read_table(storage.join(out, shard), [S.ID, S.AUDIO, S.TRANSCRIPT]).to_pylist():
            rows[row[S.ID]] = row
    for m in manifest:
        rel = m[S.SOURCE_URI].removeprefix(prefix)
        want = expected[rel]
        assert not want.reasons, (rel, "accepted")
        assert m[S.ID] == want.id and m[S.TRANSCRIPT] == want.transcript, (rel, m)
        audio, rate = sf.read(io.BytesIO(rows[m[S.ID]][S.AUDIO]), dtype="float32")
        assert rate == 16000 and len(audio) == m[S.NUM_SAMPLES], rel
        assert abs(len(audio) - want.num_samples) <= want.tolerance, (rel, len(audio))
        assert float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) >= want.min_rms, rel
        if want.freq:
            assert T.dominant_frequency(audio, 16000) == pytest.approx(want.freq, abs=3), rel
    reasons = Counter(r[S.REASON] for r in rejects)
    assert summary["rejected_by_reason"] == dict(sorted(reasons.items()))
    assert summary["rejected_signal_lost"] == reasons[V.REASON_SIGNAL_LOST] >= 7
    sidecar = summary["sidecar"]
    assert sidecar["rows_unmatched"] == H.NAME_SIDECAR_UNMATCHED
    assert sidecar["rows_duplicate"] == H.NAME_SIDECAR_DUPLICATE
    read = [w for w in expected.values() if not w.reasons & V.LISTING_REASONS]
    assert sidecar["files_without_row"] == sum(w.transcript is None for w in read)


def test_hostile_corpus_from_a_local_directory(tmp_path: Path, ray_local: None) -> None:
    raw = tmp_path / "raw"

    def write(rel: str, data: bytes) -> None:
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).write_bytes(data)

    expected = _write_hostile(write)
    for rel, reason in H.write_link_cases(raw, tmp_path / "outside").items():
        expected[rel] = Expected(frozenset({reason})) if reason else Expected(num_samples=8000, id=rel[:-4] if
                                                                               rel.endswith(".wav") else rel[:-5])
    out = tmp_path / "out"
    cfg = replace(tiny().data, shard_size_mb=1.0, valid_fraction=0.0, prepare_min_seconds=0.1)
    summary = prepare(str(raw), str(out), cfg, progress=lambda _: None)
    _check_hostile(str(raw), str(out), summary, expected)
    assert summary["directories_skipped"]["repeated"] == 2
    assert summary["files_not_audio"] == {"": 2, ".md": 1, ".textgrid": 1, ".tsv": 1, ".txt": 2}


def test_hostile_corpus_from_s3(s3_store: S3Store, ray_local: None) -> None:
    raw = s3_store.uri("hostile", "raw")
    expected = _write_hostile(lambda rel, data: storage.write_bytes(f"{raw}/{rel}", data))
    out = s3_store.uri("hostile", "out")
    cfg = replace(tiny().data, shard_size_mb=1.0, valid_fraction=0.0, prepare_min_seconds=0.1)
    summary = prepare(raw, out, cfg, progress=lambda _: None)
    _check_hostile(raw, out, summary, expected)
    assert summary["files_not_audio"] == {"": 2, ".md": 1, ".textgrid": 1, ".tsv": 1, ".txt": 1}
