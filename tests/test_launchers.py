"""The launchers: installers/bootstrap.py does the work on every system, run here from a fresh copy; the .sh and
.bat only find Python and start it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from apprunner import ROOT, free_port

LINUX = ROOT / "installers" / "linux" / "fluxstudio.sh"
BAT = ROOT / "installers" / "windows" / "FluxStudio.bat"
BOOTSTRAP = ROOT / "installers" / "bootstrap.py"
OPTIONS = ("--share", "--port", "--cpu", "--update", "--no-browser", "--smoke-test")


def fresh_copy(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (tests/run.sh installs it)")
def test_shellcheck_is_clean():
    proc = subprocess.run(
        ["shellcheck", str(LINUX), str(ROOT / "tests" / "run.sh"), str(ROOT / ".ci" / "run")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout


class Launcher:
    """The Linux launcher of a fresh copy in a folder with a space and non-ASCII letters, with its own data folder."""

    def __init__(self, tmp: Path) -> None:
        self.app = fresh_copy(tmp / "Zoë Müller" / "FluxStudio")
        self.data = tmp / "data"
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.port = str(free_port())
        self.env = dict(
            os.environ,
            FLUXSTUDIO_HOME=str(self.data),
            FLUXSTUDIO_TORCH="torch==2.13.0",
            FLUXSTUDIO_TORCH_INDEX_BASE="http://127.0.0.1:9/whl",  # nothing answers: PyPI takes over
            HF_HOME=str(tmp / "hf"),
            PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
        )
        for var in ("VIRTUAL_ENV", "FLUXSTUDIO_TORCH_INDEX", "PYTHONPATH"):
            self.env.pop(var, None)

    @property
    def log(self) -> str:
        return (self.data / "logs" / "launcher.log").read_text(encoding="utf-8", errors="replace")

    def cmd(self, *extra: str) -> list[str]:
        return [
            "bash",
            str(self.app / "installers" / "linux" / "fluxstudio.sh"),
            "--no-browser",
            "--smoke-test",
            "--port",
            self.port,
            *extra,
        ]

    def run(self, *extra: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.cmd(*extra), env=env or self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def fake_nvidia_smi(self, present: bool) -> None:
        smi = self.bin / "nvidia-smi"
        if present:
            smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-0)'\n")
            smi.chmod(0o755)
        else:
            smi.unlink(missing_ok=True)

    def index_down(self, tmp: Path) -> dict:
        """pip as it is, except that PyTorch's index cannot be reached (this machine's pip finds torch in its local
        wheel folder whatever the index, so the outage is made here)."""
        shim = tmp / "indexdown" / "pip"
        shim.mkdir(parents=True)
        (shim / "__init__.py").write_text("")
        (shim / "__main__.py").write_text(
            "import os, runpy, sys\n"
            "if '--index-url' in sys.argv:\n"
            "    sys.stderr.write('ERROR: Could not connect to the index (simulated outage)\\n')\n"
            "    sys.exit(1)\n"
            "here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))\n"
            "sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != here]\n"
            "for name in [m for m in sys.modules if m == 'pip' or m.startswith('pip.')]:\n"
            "    del sys.modules[name]\n"
            "runpy.run_module('pip', run_name='__main__', alter_sys=True)\n"
        )
        return dict(self.env, PYTHONPATH=str(shim.parent))

    def fake_pip(self, tmp: Path, exit_code: int) -> dict:
        """A pip that writes warnings to stderr (as pip does) and exits with `exit_code`: first on the path."""
        shim = tmp / f"fakepip{exit_code}" / "pip"
        shim.mkdir(parents=True)
        (shim / "__init__.py").write_text("")
        (shim / "__main__.py").write_text(
            "import sys\nsys.stderr.write('WARNING: Retrying (Retry(total=1)) after connection broken\\n')\n"
            "sys.stderr.write('DEPRECATION: something pip says on stderr\\n')\n"
            f"sys.exit({exit_code})\n"
        )
        return dict(self.env, PYTHONPATH=str(shim.parent))


@pytest.mark.slow
def test_bootstrap_installs_resumes_skips_and_reinstalls(tmp_path):
    """One fresh copy through its life: a first install killed midway, the rebuilt install (CUDA index asked for
    with an NVIDIA GPU, PyPI when that index is unreachable), a start that skips installation, a reinstall for
    changed requirements (CPU index without a GPU), a pip that only warns, and a pip that fails."""
    ln = Launcher(tmp_path)
    venv = ln.app / ".venv"
    ln.fake_nvidia_smi(True)
    outage = ln.index_down(tmp_path)

    # 1. killed while pip installs: the half-made environment is rebuilt on the next start
    proc = subprocess.Popen(
        ln.cmd(), env=outage, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (
        (venv / ".fluxstudio-installing").exists()
        and "-m pip install" in (ln.log if (ln.data / "logs" / "launcher.log").exists() else "")
    ):
        time.sleep(0.2)
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert (venv / ".fluxstudio-installing").exists() and not (venv / ".fluxstudio-stamp").exists()

    first = ln.run(env=outage)
    assert first.returncode == 0, first.stdout + first.stderr + ln.log[-3000:]
    assert "Rebuilding FluxStudio's environment" in first.stdout and "interrupted" in first.stdout
    assert "--index-url http://127.0.0.1:9/whl/cu128 torch==2.13.0" in ln.log  # the CUDA build for an NVIDIA GPU
    assert "installing PyTorch from PyPI instead" in first.stdout
    assert "Installed." in first.stdout and f"answered on http://127.0.0.1:{ln.port}/" in first.stdout
    assert (venv / ".fluxstudio-stamp").exists() and not (venv / ".fluxstudio-installing").exists()

    # 2. nothing changed: no installation
    second = ln.run()
    assert second.returncode == 0 and "skipping installation" in second.stdout and "Installed." not in second.stdout

    # 3. changed requirements and no GPU any more: reinstall, from the CPU index
    ln.fake_nvidia_smi(False)
    (ln.app / "requirements.txt").write_text((ln.app / "requirements.txt").read_text() + "\n# changed\n")
    third = ln.run()
    assert third.returncode == 0 and "Installed." in third.stdout, third.stdout + third.stderr
    assert "--index-url http://127.0.0.1:9/whl/cpu torch==2.13.0" in ln.log

    # 4. a pip that writes warnings to stderr and exits 0 has succeeded
    warned = ln.run("--update", env=ln.fake_pip(tmp_path, 0))
    assert warned.returncode == 0 and "Installed." in warned.stdout, warned.stdout + warned.stderr
    assert "WARNING: Retrying" in ln.log and "WARNING" not in warned.stdout + warned.stderr

    # 5. a pip that exits non-zero is one clear sentence, and the next start tries again
    failed = ln.run("--update", env=ln.fake_pip(tmp_path, 1))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert (
        "FluxStudio could not start: installing PyTorch failed (network?). Start FluxStudio again to retry."
        in failed.stderr
    )
    assert f"The full log is in: {ln.data / 'logs' / 'launcher.log'}" in failed.stderr
    assert not (venv / ".fluxstudio-stamp").exists() and not (venv / ".fluxstudio-installing").exists()


def test_linux_launcher_says_what_is_wrong(tmp_path):
    proc = subprocess.run(
        ["bash", str(LINUX), "--bogus"],
        capture_output=True,
        text=True,
        env=dict(os.environ, FLUXSTUDIO_HOME=str(tmp_path)),
        check=False,
    )
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr
    proc = subprocess.run(
        ["bash", str(LINUX), "--help"],
        capture_output=True,
        text=True,
        env=dict(os.environ, FLUXSTUDIO_HOME=str(tmp_path)),
        check=False,
    )
    assert proc.returncode == 0 and all(o in proc.stdout for o in OPTIONS)


def test_linux_launcher_without_python(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "readlink"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    proc = subprocess.run(
        ["/bin/bash", str(LINUX)], capture_output=True, text=True, env={"PATH": str(bin_dir)}, check=False
    )
    assert proc.returncode == 1 and "needs Python 3.10, 3.11 or 3.12" in proc.stderr


def test_bootstrap_refuses_an_unsupported_python(tmp_path):
    code = (
        "import runpy, sys; sys.version_info = (3, 9, 0, 'final', 0); sys.argv = ['bootstrap.py'];"
        f"runpy.run_path(r'{BOOTSTRAP}', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, FLUXSTUDIO_HOME=str(tmp_path)),
        check=False,
    )
    assert proc.returncode == 1 and "needs Python 3.10, 3.11 or 3.12" in proc.stderr


def test_install_desktop_entry(tmp_path):
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path), FLUXSTUDIO_HOME=str(tmp_path / "data"))
    proc = subprocess.run(
        ["bash", str(LINUX), "--install-desktop"], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    entry = (tmp_path / "applications" / "FluxStudio.desktop").read_text()
    assert f"Icon={ROOT}/fluxstudio/ui/assets/icon.png" in entry and f'Exec=bash "{LINUX}"' in entry
    assert "Terminal=true" in entry


def test_windows_bat_only_finds_python_and_runs_the_bootstrap():
    """FluxStudio.bat, read line by line: the Python probes in order with a version check, the bootstrap called
    with every option, what to install when there is no Python, and a pause whenever it fails."""
    lines = [line.strip() for line in BAT.read_text().splitlines() if line.strip()]
    assert len(lines) <= 45 and not list(BAT.parent.glob("*.ps1")) and "powershell" not in BAT.read_text().lower()
    text = "\n".join(lines)
    probe = next(i for i, line in enumerate(lines) if line.startswith("for %%V in (3.12 3.11 3.10)"))
    assert lines[probe + 1] == 'py -%%V -c "import sys" >nul 2>&1 && set "PY=py -%%V"'
    fallback = next(i for i, line in enumerate(lines) if line.startswith("python -c"))
    assert fallback > probe and "(3, 10) <= sys.version_info[:2] <= (3, 12)" in lines[fallback]
    assert 'set "BOOTSTRAP=%~dp0..\\bootstrap.py"' in lines
    call = lines.index('%PY% "%BOOTSTRAP%" %*')
    assert lines[call + 1] == "if errorlevel 1 goto failed"
    assert lines.index("if not defined PY goto nopython") < call
    for label in (":nopython", ":failed"):
        block = lines[lines.index(label) :]
        assert "pause" in block[: block.index("exit /b 1")], label
    assert "winget install Python.Python.3.12" in text and "Add python.exe to PATH" in text
    assert "launcher.log" in text
    for option in OPTIONS:
        assert option in BOOTSTRAP.read_text() and option in BAT.read_text()
