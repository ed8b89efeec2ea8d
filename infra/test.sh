#!/usr/bin/env bash
# Set up (if needed) and run wavray's checks: ruff, the import boundaries, the tests.
# Extra arguments go to pytest (e.g. `bash infra/test.sh -k config`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
# shellcheck disable=SC1091
source infra/loopback.env
echo "[test] ruff"
ruff check .
echo "[test] import boundaries"
lint-imports
echo "[test] pytest"
python -m pytest "$@"
