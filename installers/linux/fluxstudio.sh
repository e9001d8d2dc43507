#!/usr/bin/env bash
# FluxStudio launcher for Linux. Double-click FluxStudio.desktop, or run: bash installers/linux/fluxstudio.sh
# It finds Python 3.10-3.12 and runs installers/bootstrap.py, which sets up .venv on the first start and starts
# the app. Options (passed on): --share  --port N  --cpu  --update  --no-browser  --smoke-test  --install-desktop
set -u
APP_DIR="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)"

for candidate in python3.12 python3.11 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)' 2>/dev/null; then
        "$candidate" "$APP_DIR/installers/bootstrap.py" "$@"
        status=$?
        if [ "$status" != 0 ] && [ -t 0 ]; then
            read -r -p "Press Enter to close." _
        fi
        exit "$status"
    fi
done

echo "FluxStudio needs Python 3.10, 3.11 or 3.12. Install it (Debian/Ubuntu: sudo apt install python3 python3-venv;" >&2
echo "Fedora: sudo dnf install python3), then start FluxStudio again." >&2
if [ -t 0 ]; then
    read -r -p "Press Enter to close." _
fi
exit 1
