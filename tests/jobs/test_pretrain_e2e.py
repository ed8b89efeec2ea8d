"""End to end through ``ray job submit``: a Ray head on 127.0.0.1, the demo corpus prepared
into the local S3 object store, ``jobs.pretrain`` (tiny, 2 workers x 0.5 CPU, ZeRO-2)
checkpointing into the bucket and tracking to MLflow, then a second submit with the
same run name that resumes at the saved step.

Ray 2.60 token authentication: ``ray start`` uses the token in ``~/.ray/auth_token``
(creating it when missing); client commands need ``RAY_AUTH_MODE=token`` and read the
same file. The head is stopped by the PIDs of the processes it started (found by its
own temp directory), never with ``ray stop``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pyarrow.fs as pafs
import pytest
from fixtures.objectstore import s3_store  # noqa: F401 - the session fixture

from pipeline.data import storage
from pipeline.net import free_ports
from pipeline.tracking import Tracker

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TOKEN_FILE = Path.home() / ".ray" / "auth_token"


def _processes_of(temp_dir: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if temp_dir in cmd and p.pid != os.getpid():
            found.append(p)
    return found


def _stop_by_pid(temp_dir: str) -> None:
    procs = _processes_of(temp_dir)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:  # gcs_server may ignore SIGTERM (STACK.md)
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def ray_head(s3_store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:  # noqa: F811
    temp_dir = str(tmp_path_factory.mktemp("rayhead"))
    gcs, dash, client, mgr, node_mgr, agent, metrics, rt = free_ports(8)
    env = dict(os.environ, RAY_AUTH_MODE="token")
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--node-ip-address=127.0.0.1",
        f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}", f"--object-manager-port={mgr}", f"--node-manager-port={node_mgr}",
        f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt}", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert TOKEN_FILE.is_file(), "ray start should have written the token"
        yield {
            **env,
            "RAY_ADDRESS": f"http://127.0.0.1:{dash}",
            "RAY_TEMP_DIR": temp_dir,
        }
    finally:
        _stop_by_pid(temp_dir)


def _submit(env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", env["RAY_ADDRESS"],
           "--working-dir", str(ROOT), "--", *args]
    job_env = {k: v for k, v in env.items() if k != "RAY_TEMP_DIR"}
    return subprocess.run(cmd, env=job_env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _s3_children(uri: str) -> list[str]:
    return sorted(info.base_name for info in storage.list_dir(uri))


@pytest.fixture(scope="module")
def demo_uri(ray_head, s3_store, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: F811
    """The demo corpus, prepared into the bucket by a ``jobs.prepare`` job."""
    from pipeline.data.demo_corpus import make_corpus

    corpus = tmp_path_factory.mktemp("e2e") / "corpus"
    make_corpus(corpus, minutes=1.5, seed=5, progress=lambda _: None)
    data_uri = s3_store.uri("demo")
    prep = _submit(ray_head, "python", "-m", "jobs.prepare", "--input", str(corpus), "--output", data_uri,
                   "--preset", "tiny", "data.shard_size_mb=0.5")
    assert prep.returncode == 0, prep.stdout[-3000:] + prep.stderr[-3000:]
    return data_uri


def _pretrain_args(data_uri: str, runs_uri: str, db: Path, run_name: str) -> list[str]:
    return [
        "python", "-m", "jobs.pretrain", "--config", "jobs/configs/pretrain/tiny.yaml",
        f"data.train_uri={data_uri}", f"checkpoint.storage_path={runs_uri}", f"checkpoint.run_name={run_name}",
        f"tracking.uri=sqlite:///{db}", "checkpoint.every_steps=4", "train.log_every=2",
        "data.decode_cpus=0.5", "data.max_samples_per_batch=64000", "data.max_sample_size=32000",
    ]


def test_job_submit_pretrains_into_the_bucket_and_resumes(
    ray_head, s3_store, demo_uri: str, tmp_path: Path  # noqa: F811
) -> None:
    data_uri = demo_uri
    db = tmp_path / "mlflow" / "mlflow.db"
    runs_uri = s3_store.uri("runs")
    common = _pretrain_args(data_uri, runs_uri, db, "e2e")
    first = _submit(ray_head, *common, "train.max_steps=8")
    out1 = first.stdout + first.stderr
    assert first.returncode == 0, out1[-5000:]
    assert "succeeded" in out1.lower()
    assert "[wavray] step 8/8 loss" in out1
    assert f"[wavray] checkpoint: {runs_uri}/e2e/checkpoint_000000008 (step 8)" in out1
    assert "[wavray] MLflow UI:" in out1

    # Checkpoints in the bucket: complete wavray model checkpoints plus every rank's state.
    ckpts = [n for n in _s3_children(f"{runs_uri}/e2e") if n.startswith("checkpoint_0")]
    assert ckpts == ["checkpoint_000000004", "checkpoint_000000008"]
    files = _s3_children(f"{runs_uri}/e2e/checkpoint_000000008")
    assert {"config.yaml", "model.safetensors", "trainer_state.json", "deepspeed", "rng"} <= set(files)
    fs, path = storage.resolve(f"{runs_uri}/e2e/checkpoint_000000008/deepspeed")
    shards = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))]
    assert any("zero_pp_rank_0_" in s for s in shards) and any("zero_pp_rank_1_" in s for s in shards)

    # MLflow: params are the dotted config, metrics every log_every updates.
    tracker = Tracker(f"sqlite:///{db}", "wavray", "")
    (run,) = tracker.client.search_runs(
        [tracker.client.get_experiment_by_name("wavray").experiment_id], "tags.`wavray.run_name` = 'e2e'"
    )
    assert run.info.status == "FINISHED"
    assert run.data.params["deepspeed.zero_stage"] == "2" and run.data.params["scaling.num_workers"] == "2"
    assert run.data.params["data.train_uri"] == data_uri
    steps = [m.step for m in tracker.client.get_metric_history(run.info.run_id, "loss")]
    assert steps == [2, 4, 6, 8]
    for key in ("accuracy", "perplexity/code_0", "perplexity/prob_1", "temperature", "lr", "grad_norm",
                "speed/audio_s_per_s", "speed/data_wait_frac"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in tracker.client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "hf_model"} <= artifacts

    # The same run name resumes at the saved step and extends the same MLflow run.
    second = _submit(ray_head, *common, "train.max_steps=12")
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2[-5000:]
    assert "[wavray] resumed from step 8" in out2
    assert "[wavray] step 2/12" not in out2 and "[wavray] step 10/12 loss" in out2
    assert f"{runs_uri}/e2e/checkpoint_000000012 (step 12)" in out2
    rerun = tracker.client.get_run(run.info.run_id)
    assert rerun.data.tags["wavray.resumed_from"] == "8" and rerun.info.status == "FINISHED"
    steps = [m.step for m in tracker.client.get_metric_history(run.info.run_id, "loss")]
    assert steps == [2, 4, 6, 8, 10, 12]

    # The object store's secret key reached neither the job logs nor the tracking store.
    for text in (out1, out2, db.read_bytes().decode("latin-1")):
        assert s3_store.secret_key not in text
    # Nor any log of the Ray instance, nor the metadata of its jobs and actors.
    for path in Path(ray_head["RAY_TEMP_DIR"]).rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 64_000_000:
            assert s3_store.secret_key.encode() not in path.read_bytes(), path
    for what in (["job", "list"], ["list", "actors", "--detail"], ["list", "jobs", "--detail"]):
        listed = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *what, "--address", ray_head["RAY_ADDRESS"]],
                                env={k: v for k, v in ray_head.items() if k != "RAY_TEMP_DIR"},
                                capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stderr[-2000:]
        assert "jobs.pretrain" in listed.stdout or what[0] == "list", "the listing shows the jobs it checks"
        assert s3_store.secret_key not in listed.stdout + listed.stderr, what

    # The console is wavray's: progress lines, not Ray Train's record of every report.
    assert "Reporting training result" not in out1 + out2
