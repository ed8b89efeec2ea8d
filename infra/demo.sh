#!/usr/bin/env bash
# The wavray demo, end to end on one machine, from nothing:
#   set up -> start the local S3 object store -> synthesise a demo corpus -> prepare it into
#   the bucket -> pretrain the laptop preset on a local Ray (2 workers, DeepSpeed ZeRO-2),
#   checkpoints in the bucket, metrics in MLflow -> say where everything is.
#
#   bash infra/demo.sh [a.b.c=value ...]       # extra overrides go to jobs.pretrain
#
# Environment knobs: DEMO_MINUTES (speech to synthesise, default 12), DEMO_RUN (run name,
# default demo; the same name resumes), KEEP_OBJECTSTORE=1 (leave the store running).
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
# shellcheck disable=SC1091
source infra/loopback.env

MINUTES="${DEMO_MINUTES:-12}"
RUN="${DEMO_RUN:-demo}"
BUCKET=wavray
RUNS_DIR="$PWD/runs"
mkdir -p "$RUNS_DIR"

echo "== 1/4 object store (SeaweedFS on 127.0.0.1)"
started_store=0
if ! bash infra/objectstore.sh status >/dev/null 2>&1; then
  bash infra/objectstore.sh start --bucket "$BUCKET"
  started_store=1
fi
stop_store() {
  if [ "$started_store" = 1 ] && [ "${KEEP_OBJECTSTORE:-0}" != 1 ]; then
    bash infra/objectstore.sh stop || true
  fi
}
trap stop_store EXIT
# shellcheck disable=SC1091
source .objectstore/credentials.env

echo "== 2/4 demo corpus (${MINUTES} min of synthesised speech)"
if [ ! -f demo_data/corpus/transcripts.tsv ]; then
  python -m jobs.demo_corpus --output demo_data/corpus --minutes "$MINUTES"
else
  echo "demo_data/corpus exists: reusing it"
fi

echo "== 3/4 prepare -> s3://$BUCKET/demo"
python -m jobs.prepare --input demo_data/corpus --output "s3://$BUCKET/demo" --preset tiny \
  --num-cpus 2 data.shard_size_mb=2

echo "== 4/4 pretrain (laptop preset, local Ray, checkpoints to s3://$BUCKET/runs)"
python -m jobs.pretrain --config jobs/configs/pretrain/laptop.yaml \
  data.train_uri="s3://$BUCKET/demo" \
  checkpoint.storage_path="s3://$BUCKET/runs" checkpoint.run_name="$RUN" \
  tracking.uri="sqlite:///$RUNS_DIR/mlflow.db" "$@"

cat <<TXT

Demo finished.
  checkpoints : s3://$BUCKET/runs/$RUN   (object store data in .objectstore/; restart it with
                bash infra/objectstore.sh start, then: source .objectstore/credentials.env)
  MLflow UI   : bash infra/mlflow_server.sh start --backend-store-uri sqlite:///$RUNS_DIR/mlflow.db
                then open http://127.0.0.1:5000 (stop: bash infra/mlflow_server.sh stop)
TXT
