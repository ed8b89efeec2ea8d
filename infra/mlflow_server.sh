#!/usr/bin/env bash
# Start or stop an MLflow tracking server (UI + model registry) on 127.0.0.1.
#
#   infra/mlflow_server.sh start [--port 5000] [--backend-store-uri sqlite:///ABS/runs/mlflow.db]
#                                [--artifacts-destination ABS/runs/mlartifacts]
#   infra/mlflow_server.sh status
#   infra/mlflow_server.sh stop          # stops only the PID that `start` recorded
#
# Defaults serve the store a local run writes by itself (checkpoint.storage_path=runs):
# sqlite:///$PWD/runs/mlflow.db with artifacts in runs/mlartifacts. Runs can also log to
# the server directly: tracking.uri=http://127.0.0.1:5000.
# State (PID, URL, log) lives in $WAVRAY_MLFLOW_DIR (default: .mlflow at the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source infra/loopback.env
MLFLOW=mlflow
[ -x .venv/bin/mlflow ] && MLFLOW=.venv/bin/mlflow
STATE_DIR="${WAVRAY_MLFLOW_DIR:-.mlflow}"
PID_FILE="$STATE_DIR/pid"
URL_FILE="$STATE_DIR/url"
LOG_FILE="$STATE_DIR/mlflow.log"

usage() { echo "usage: $0 start [--port N] [--backend-store-uri URI] [--artifacts-destination DIR] | stop | status" >&2; exit 2; }

alive() {  # the recorded PID is running and is an mlflow server
  [ -f "$PID_FILE" ] || return 1
  local pid; pid="$(cat "$PID_FILE")"
  kill -0 "$pid" 2>/dev/null || return 1
  grep -qa "mlflow" "/proc/$pid/cmdline" 2>/dev/null
}

[ $# -ge 1 ] || usage
cmd="$1"; shift
case "$cmd" in
  start)
    port=5000
    backend="sqlite:///$PWD/runs/mlflow.db"
    artifacts="$PWD/runs/mlartifacts"
    while [ $# -gt 0 ]; do
      case "$1" in
        --port) port="$2"; shift 2 ;;
        --backend-store-uri) backend="$2"; shift 2 ;;
        --artifacts-destination) artifacts="$2"; shift 2 ;;
        *) usage ;;
      esac
    done
    if alive; then
      echo "mlflow server already running (pid $(cat "$PID_FILE")): $(cat "$URL_FILE")"
      exit 0
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "error: port $port on 127.0.0.1 is taken; choose another with --port" >&2
      exit 1
    fi
    mkdir -p "$STATE_DIR" "$artifacts"
    case "$backend" in sqlite:///*) mkdir -p "$(dirname "${backend#sqlite:///}")" ;; esac
    # setsid: the server and its workers form their own session, so `stop` can end
    # exactly them and nothing else.
    setsid "$MLFLOW" server --host 127.0.0.1 --port "$port" \
      --backend-store-uri "$backend" --artifacts-destination "$artifacts" \
      --workers 1 >"$LOG_FILE" 2>&1 < /dev/null &
    echo $! > "$PID_FILE"
    echo "http://127.0.0.1:$port" > "$URL_FILE"
    for _ in $(seq 1 120); do
      if curl -sf --noproxy '*' "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
        echo "mlflow server on http://127.0.0.1:$port (pid $(cat "$PID_FILE"), store $backend)"
        exit 0
      fi
      if ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
        echo "error: mlflow server exited; see $LOG_FILE" >&2
        tail -n 20 "$LOG_FILE" >&2 || true
        rm -f "$PID_FILE"
        exit 1
      fi
      sleep 0.5
    done
    echo "error: mlflow server did not answer on port $port within 60 s; see $LOG_FILE" >&2
    exit 1
    ;;
  stop)
    if ! alive; then
      echo "mlflow server not running"
      rm -f "$PID_FILE"
      exit 0
    fi
    pid="$(cat "$PID_FILE")"
    # The session setsid made for it: its id is the server's PID, it holds only its workers.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"
    fi
    rm -f "$PID_FILE"
    echo "mlflow server stopped (pid $pid)"
    ;;
  status)
    if alive; then
      echo "running (pid $(cat "$PID_FILE")): $(cat "$URL_FILE")"
    else
      echo "not running"
      exit 1
    fi
    ;;
  *) usage ;;
esac
