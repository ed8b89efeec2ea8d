#!/usr/bin/env bash
# Start or stop the local S3-compatible object store (SeaweedFS `weed mini`) on loopback.
#
#   infra/objectstore.sh start [--port 8333] [--bucket wavray]   # prints the endpoint
#   source .objectstore/credentials.env                          # AWS_ENDPOINT_URL + keys
#   infra/objectstore.sh status
#   infra/objectstore.sh stop                                    # stops only the PID it started
#
# Every port is chosen explicitly and bound to 127.0.0.1; telemetry, WebDAV and the admin
# UI are off. State (data, log, PID, endpoint) lives in $WAVRAY_OBJECTSTORE_DIR
# (default: .objectstore at the repository root). Credentials: AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY if set, else random ones written to credentials.env (mode 0600).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source infra/loopback.env
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
STATE_DIR="${WAVRAY_OBJECTSTORE_DIR:-.objectstore}"
if [ $# -lt 1 ]; then
  echo "usage: $0 start|stop|status [--port N] [--bucket NAME]..." >&2
  exit 2
fi
cmd="$1"; shift
exec "$PY" -m pipeline.data.objectstore "$cmd" --state-dir "$STATE_DIR" "$@"
