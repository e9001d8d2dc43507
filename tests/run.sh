#!/usr/bin/env bash
# Set up everything the tests need on a fresh Linux machine, check the code, then run the tests:
#   bash tests/run.sh                  everything (what CI runs)
#   bash tests/run.sh -m "not slow"    the fast lane: no browsers, wide models, fresh installs or throttled downloads
# - a virtual environment in .venv with the CPU build of torch (FLUXSTUDIO_TORCH overrides the pin)
# - the app's requirements and the test tools (pytest, playwright, ruff, pyright)
# - Debian's chromium (browser tests) and shellcheck (launcher tests) when apt-get can install them, while pip installs
# - the quality gate: ruff check, ruff format --check and pyright (configured in pyproject.toml), before any test
# - the tests on two processes (pytest-xdist), a test file to each, one torch thread each: much of the suite waits
#   (app starts, browsers, throttled downloads, installs) while the other process computes
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
apt=""
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    {
        { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"; } >/dev/null 2>&1 \
            || echo "note: could not install ${need[*]}; the tests that need them will be skipped" >&2
    } &
    apt=$!
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
py=.venv/bin/python
"$py" -m pip install -q --disable-pip-version-check "${FLUXSTUDIO_TORCH:-torch==2.13.0}"
"$py" -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
[ -z "$apt" ] || wait "$apt"

"$py" -m ruff check .
"$py" -m ruff format --check .
"$py" -m pyright
# one torch thread in each test process (and the apps they start): with more threads than cores, torch's parallel
# steps wait for threads the other process keeps off a core (NF4's chunks: 8 s alone, 80 s beside a busy process)
export OMP_NUM_THREADS=1
exec "$py" -m pytest -n 2 --dist loadfile "$@"
