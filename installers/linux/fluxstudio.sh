#!/usr/bin/env bash
# FluxStudio launcher for Linux. Double-click FluxStudio.desktop, or run: bash installers/linux/fluxstudio.sh
#
# First start: finds Python 3.10-3.12, makes .venv in the app folder, installs PyTorch (the CUDA build when an
# NVIDIA GPU is present, else the CPU build) and requirements.txt. Later starts skip that unless requirements
# changed (a hash stamp) or --update is given. Then it starts the app and opens the browser.
#
# Options: --share  --port N  --cpu  --update  --no-browser  --smoke-test  --install-desktop  --help
# Environment: FLUXSTUDIO_TORCH_INDEX (torch wheel index URL, or "pypi" for pip's own), FLUXSTUDIO_TORCH (the
# torch requirement, default "torch"), FLUXSTUDIO_HOME (data folder).
set -uo pipefail

APP_DIR="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)"
DATA_DIR="${FLUXSTUDIO_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/FluxStudio}"
LOG_DIR="$DATA_DIR/logs"
LOG="$LOG_DIR/launcher.log"
VENV="$APP_DIR/.venv"
PORT=7860
SHARE=0
CPU=0
UPDATE=0
BROWSER=1
SMOKE=0

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

fail() {
    echo >&2
    echo "FluxStudio could not start: $1" >&2
    echo "The full log is in: $LOG" >&2
    if [ -t 0 ]; then
        read -r -p "Press Enter to close." _
    fi
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
        --share) SHARE=1 ;;
        --port) shift; PORT="${1:-}"; [[ "$PORT" =~ ^[0-9]+$ ]] || { echo "--port needs a number" >&2; exit 2; } ;;
        --cpu) CPU=1 ;;
        --update) UPDATE=1 ;;
        --no-browser) BROWSER=0 ;;
        --smoke-test) SMOKE=1; BROWSER=0 ;;
        --install-desktop) INSTALL_DESKTOP=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "Unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

mkdir -p "$LOG_DIR" || fail "cannot create $LOG_DIR"
echo "=== $(date '+%F %T') FluxStudio launcher ===" >>"$LOG"

if [ "${INSTALL_DESKTOP:-0}" = 1 ]; then
    apps="${XDG_DATA_HOME:-$HOME/.local/share}/applications"
    mkdir -p "$apps"
    sed -e "s|^Exec=.*|Exec=bash \"$APP_DIR/installers/linux/fluxstudio.sh\"|" \
        -e "s|^Icon=.*|Icon=$APP_DIR/assets/icon.png|" \
        "$APP_DIR/installers/linux/FluxStudio.desktop" >"$apps/FluxStudio.desktop"
    chmod +x "$apps/FluxStudio.desktop"
    echo "Installed $apps/FluxStudio.desktop: FluxStudio is now in your applications menu."
    exit 0
fi

find_python() {
    local candidate
    for candidate in python3.12 python3.11 python3.10 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

venv_ok() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1
}

if ! venv_ok; then
    PYTHON="$(find_python)" || fail "FluxStudio needs Python 3.10, 3.11 or 3.12. Install it (Debian/Ubuntu: sudo apt install python3 python3-venv; Fedora: sudo dnf install python3), then start FluxStudio again."
    echo "Setting up FluxStudio in $VENV (first start only)..."
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" >>"$LOG" 2>&1 || fail "could not create a virtual environment (Debian/Ubuntu: sudo apt install python3-venv)."
fi
PY="$VENV/bin/python"

# Which torch build: CUDA where an NVIDIA GPU answers, else CPU; FLUXSTUDIO_TORCH_INDEX overrides.
if [ -n "${FLUXSTUDIO_TORCH_INDEX:-}" ]; then
    INDEX="$FLUXSTUDIO_TORCH_INDEX"
elif [ "$CPU" = 0 ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    INDEX="https://download.pytorch.org/whl/cu128"
else
    INDEX="https://download.pytorch.org/whl/cpu"
fi
TORCH="${FLUXSTUDIO_TORCH:-torch}"
STAMP="$VENV/.fluxstudio-stamp"
WANT="$( { cat "$APP_DIR/requirements.txt"; echo "$TORCH $INDEX"; } | sha256sum | cut -d' ' -f1)"

if [ "$UPDATE" = 1 ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "Installing PyTorch ($TORCH from $INDEX) and FluxStudio's requirements; the first time this downloads about 3 GB with CUDA, 1 GB without. See $LOG"
    rm -f "$STAMP"
    if [ "$INDEX" = "pypi" ]; then
        "$PY" -m pip install --disable-pip-version-check "$TORCH" >>"$LOG" 2>&1 ||
            fail "installing PyTorch failed (network?). Start FluxStudio again to retry."
    elif ! "$PY" -m pip install --disable-pip-version-check --timeout 30 --retries 1 --index-url "$INDEX" "$TORCH" >>"$LOG" 2>&1; then
        [ -z "${FLUXSTUDIO_TORCH_INDEX:-}" ] || fail "installing PyTorch from $INDEX failed. Start FluxStudio again to retry."
        echo "PyTorch's own index could not be used; installing PyTorch from PyPI instead."
        "$PY" -m pip install --disable-pip-version-check "$TORCH" >>"$LOG" 2>&1 ||
            fail "installing PyTorch failed (network?). Start FluxStudio again to retry."
    fi
    "$PY" -m pip install --disable-pip-version-check -r "$APP_DIR/requirements.txt" >>"$LOG" 2>&1 ||
        fail "installing the requirements failed (network?). Start FluxStudio again to retry."
    echo "$WANT" >"$STAMP"
    echo "Installed."
else
    echo "FluxStudio is up to date (requirements unchanged): skipping installation."
fi

ARGS=(--port "$PORT")
[ "$SHARE" = 1 ] && ARGS+=(--share)
[ "$BROWSER" = 1 ] && ARGS+=(--inbrowser)

if [ "$SMOKE" = 1 ]; then
    "$PY" "$APP_DIR/app.py" "${ARGS[@]}" >>"$LOG" 2>&1 &
    pid=$!
    for _ in $(seq 1 180); do
        if "$PY" -c "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$PORT/', timeout=2).status == 200 else 1)" 2>/dev/null; then
            echo "FluxStudio answered on http://127.0.0.1:$PORT/"
            kill "$pid" 2>/dev/null
            wait "$pid" 2>/dev/null
            exit 0
        fi
        kill -0 "$pid" 2>/dev/null || fail "the app exited during start-up."
        sleep 1
    done
    kill "$pid" 2>/dev/null
    fail "the app did not answer on port $PORT within 3 minutes."
fi

echo "Starting FluxStudio on http://127.0.0.1:$PORT/ (close this window to stop it)."
"$PY" "$APP_DIR/app.py" "${ARGS[@]}" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
[ "$status" = 0 ] || fail "the app stopped with an error."
