#!/usr/bin/env bash
# Install medvit with its dev tools into .venv and run the whole test suite (slow tests too).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e ".[dev]"
# The report tests open the HTML in a real headless browser (Debian's chromium).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; browser tests will be skipped (and fail with CI=1)" >&2
fi
export OMP_WAIT_POLICY=PASSIVE WANDB_MODE=offline WANDB_SILENT=true
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/python -m pytest "$@"
