"""The double-click launchers: a fresh copy sets itself up, starts, answers HTTP 200, and skips setup next time."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from apprunner import ROOT, free_port

LINUX = ROOT / "installers" / "linux" / "fluxstudio.sh"
WINDOWS = ROOT / "installers" / "windows"
OPTIONS = ("--share", "--port", "--cpu", "--update", "--no-browser", "--smoke-test")


def fresh_copy(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (tests/run.sh installs it)")
def test_shellcheck_is_clean():
    proc = subprocess.run(["shellcheck", str(LINUX), str(ROOT / "tests" / "run.sh"), str(ROOT / ".ci" / "run")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_linux_launcher_from_a_fresh_copy(tmp_path):
    app = fresh_copy(tmp_path / "FluxStudio")
    assert not (app / ".venv").exists()
    env = dict(os.environ, FLUXSTUDIO_HOME=str(tmp_path / "data"), FLUXSTUDIO_TORCH_INDEX="pypi",
               FLUXSTUDIO_TORCH="torch==2.13.0", HF_HOME=str(tmp_path / "hf"))
    env.pop("VIRTUAL_ENV", None)
    port = str(free_port())
    cmd = ["bash", str(app / "installers" / "linux" / "fluxstudio.sh"), "--no-browser", "--smoke-test", "--port", port]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    log = (tmp_path / "data" / "logs" / "launcher.log").read_text(errors="replace")
    assert first.returncode == 0, first.stdout + first.stderr + log[-3000:]
    assert "Installed." in first.stdout and f"answered on http://127.0.0.1:{port}/" in first.stdout
    assert (app / ".venv" / ".fluxstudio-stamp").exists()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "skipping installation" in second.stdout and "Installed." not in second.stdout
    # a changed requirements file means a reinstall next time
    (app / "requirements.txt").write_text((app / "requirements.txt").read_text() + "\n# changed\n")
    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0 and "Installed." in third.stdout


def test_linux_launcher_says_what_is_wrong(tmp_path):
    proc = subprocess.run(["bash", str(LINUX), "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Unknown option: --bogus" in proc.stderr
    proc = subprocess.run(["bash", str(LINUX), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and all(o in proc.stdout for o in OPTIONS if o != "--smoke-test")


def test_install_desktop_entry(tmp_path):
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path), FLUXSTUDIO_HOME=str(tmp_path / "data"))
    proc = subprocess.run(["bash", str(LINUX), "--install-desktop"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    entry = (tmp_path / "applications" / "FluxStudio.desktop").read_text()
    assert f"Icon={ROOT}/assets/icon.png" in entry and f'Exec=bash "{LINUX}"' in entry
    assert "Terminal=true" in entry


def test_windows_launcher_matches_the_linux_one():
    bat = (WINDOWS / "FluxStudio.bat").read_text()
    ps1 = (WINDOWS / "fluxstudio.ps1").read_text()
    assert "fluxstudio.ps1" in bat and "pause" in bat
    for option in OPTIONS:
        assert f'"{option}"' in ps1, option
        assert option in LINUX.read_text()
    assert 'Join-Path $AppDir "requirements.txt"' in ps1 and 'Join-Path $AppDir "app.py"' in ps1
    assert '"$APP_DIR/requirements.txt"' in LINUX.read_text() and '"$APP_DIR/app.py"' in LINUX.read_text()
    for shared in ("FLUXSTUDIO_TORCH_INDEX", "FLUXSTUDIO_TORCH", "download.pytorch.org/whl/cu128",
                   "download.pytorch.org/whl/cpu", ".fluxstudio-stamp", "launcher.log", "nvidia-smi"):
        assert shared in ps1 and shared in LINUX.read_text(), shared
    assert re.search(r"3\.10.*3\.11.*3\.12|3\.12.*3\.11.*3\.10", ps1)
