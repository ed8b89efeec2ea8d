"""``python -m jobs.bench``: the subcommand registry and a tiny model-step run."""

from __future__ import annotations

import json

import pytest

from jobs import bench


def test_usage_and_unknown_subcommand(capsys):
    assert bench.main([]) == 2
    assert "model-step" in capsys.readouterr().out
    assert bench.main(["no-such-bench"]) == 2
    assert "valid: " in capsys.readouterr().err


def test_model_step_tiny_reports_both_models(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "r.json"
    rc = bench.main(["model-step", "--preset", "tiny", "--batch", "2", "--seconds", "0.5",
                     "--warmup", "1", "--repeats", "2", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "ratio ours/theirs" in text
    results = json.loads(out.read_text())
    assert results["ours"]["samples_per_s"] > 0 and results["transformers"]["samples_per_s"] > 0
    assert results["ours"]["audio_s_per_s"] == pytest.approx(results["ours"]["samples_per_s"] * 0.5)


def test_the_objectives_table_counts_labelling_and_refuses_iterations_of_other_objectives(capsys):
    """HuBERT rows: labelling's seconds come out of the budget (a row of its own column), and
    ':2' (two iterations) is a HuBERT-only suffix, refused before any work."""
    from jobs.benchmarks.objectives import _describe, main, render
    from pipeline.config import preset_config

    with pytest.raises(SystemExit):
        main(["--objectives", "laptop:2"])
    assert "for HuBERT presets only" in capsys.readouterr().err
    assert _describe(preset_config("wavlm_laptop")) != _describe(preset_config("hubert_laptop"))
    assert _describe(preset_config("w2v_bert_laptop")) == "log-mel + conformer 1+1x64"  # contrastive + masked-LM
    # vq_bert reads tokens: its random-init row is not wav2vec 2.0's, whose Transformer is the same size
    assert _describe(preset_config("vq_bert_laptop")) == "vq-wav2vec tokens (512) + transformer 2x64"
    assert _describe(preset_config("laptop")) == "conv + transformer 2x64"
    results = {
        "setup": {"seed": 0, "seconds": 60.0, "pretrain_minutes": 1.0, "num_train_voices": 2, "label_minutes": 1.0,
                  "test_minutes": 1.0, "test_voices": "a", "probe_steps": 1, "finetune_steps": 1},
        "rows": [{"label": "HuBERT 2 iterations (hubert_laptop, conv + transformer 2x64)", "params": 1000,
                  "updates": 7, "label_seconds": 12.0, "audio_s_per_s": 3.0, "probe_cer": 0.5}],
        "wall": {"total": 1.0},
    }
    table = render(results)
    assert "label s" in table and " 12 " in table and "50.0%" in table


def test_labelling_counts_in_the_clock_the_training_budget_counts_in(monkeypatch):
    """On CPU the budget is CPU-seconds, so a HuBERT row pays its labelling's CPU-seconds
    (not its elapsed time, which other load on the machine stretches); with
    ``train.budget_clock=wall``, its elapsed seconds."""
    import pipeline.label.job as job
    from jobs.benchmarks.objectives import label_corpus

    monkeypatch.setattr(job, "run_labelling", lambda cfg, progress: {"seconds": 50.0, "cpu_seconds": 20.0})
    assert label_corpus("hubert_laptop", "data", [], print) == 20.0
    assert label_corpus("hubert_laptop", "data", ["train.budget_clock=wall"], print) == 50.0


def test_the_just_table_splits_the_budget_and_shows_every_language(tmp_path):
    """Two-stage rows share one budget (whole seconds, summing to it); the joined corpus keeps
    the transcripts of the labelled files only; the table has a column per language."""
    from jobs.benchmarks.just import joint_corpus, parse_steps, render, split_budget

    assert split_budget(600, 2 / 3) == (400.0, 200.0)
    assert sum(split_budget(301, 0.5)) == 301
    with pytest.raises(ValueError, match="pretrain-share"):
        split_budget(600, 1.0)
    assert parse_steps("1500", ["a", "b"]) == {"a": 1500, "b": 1500}
    assert parse_steps("a=3000,b=6500", ["a", "b"]) == {"a": 3000, "b": 6500}
    with pytest.raises(ValueError, match="no count for b"):
        parse_steps("a=3000", ["a", "b"])

    header = "id\tpath\ttranscript\tspeaker\tlanguage\n"
    for name, text in (("u", "never used"), ("l", "ein satz")):
        (tmp_path / name / "wav").mkdir(parents=True)
        (tmp_path / name / "wav" / "a.wav").write_bytes(name.encode())
        (tmp_path / name / "transcripts.tsv").write_text(header + f"wav/a\twav/a.wav\t{text}\tde-1\tde\n")
    out = joint_corpus(tmp_path / "u", tmp_path / "l", tmp_path / "joint")
    lines = (out / "transcripts.tsv").read_text().splitlines()
    assert lines == ["path\ttranscript\tspeaker\tlanguage", "unlabelled/wav/a.wav\t\tde-1\tde",
                     "labelled/wav/a.wav\tein satz\tde-1\tde"]
    assert (out / "labelled" / "wav" / "a.wav").read_bytes() == b"l"

    results = {
        "setup": {"seed": 0, "languages": ["en", "de"], "seconds": 600.0, "budget_split": [400.0, 200.0],
                  "finetune_steps": {"wav2vec2": 3000}, "audio_minutes": 39.0, "num_train_voices": "17", "label_minutes": 9.0,
                  "test_minutes": 4.0, "test_voices": "flite-rms,de-espeak-f4"},
        "rows": [{"label": "wav2vec 2.0 (laptop) + CTC fine-tuning", "updates": [3000, 700], "cpu_seconds": 601.2,
                  "cer": 0.5, "cer_lang": {"en": 0.4, "de": 0.625}},
                 {"label": "JUST (just_laptop), one run", "updates": [5000], "cpu_seconds": 600.4, "cer": 0.3,
                  "cer_lang": {"en": 0.3}}],
        "wall": {"total": 1.0},
    }
    table = render(results).splitlines()
    assert "a schedule of 3000 updates for wav2vec2" in table[2]
    assert "ctc_weight the preset's, data.labelled_ratio as the data is" in table[3]
    assert table[5].split()[-2:] == ["en", "de"]
    assert table[6].split()[-5:] == ["3000+700", "601", "50.0%", "40.0%", "62.5%"]
    assert table[7].split()[-5:] == ["5000", "600", "30.0%", "30.0%", "-"]
