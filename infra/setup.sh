#!/usr/bin/env bash
# Set up wavray on a fresh machine: Debian packages for the demo audio, a virtual
# environment in .venv, the CPU build of torch where there is no GPU, and wavray itself.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(espeak-ng flite sox libsndfile1)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=".venv/.wavray-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ infra/constraints.txt -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    # No GPU: the CPU build of torch, installed first so that nothing pulls a CUDA build.
    python -m pip install -q "torch==2.13.0"
  fi
  echo "[setup] installing wavray and its dependencies"
  python -m pip install -q -c infra/constraints.txt -e ".[test]"
  touch "$stamp"
fi
echo "[setup] ready: $(python -c 'import torch, ray, deepspeed, mlflow; print(f"torch {torch.__version__}, ray {ray.__version__}, deepspeed {deepspeed.__version__}, mlflow {mlflow.__version__}")' 2>/dev/null)"
