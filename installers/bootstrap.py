"""FluxStudio's launcher, written once for Windows and Linux (standard library only, Python 3.10-3.12).

FluxStudio.bat and fluxstudio.sh only find a suitable Python and run this file with the options they were given.
It creates (or repairs) .venv in the app folder, installs PyTorch (the CUDA build where an NVIDIA GPU is present,
else the CPU build; PyPI when PyTorch's own index cannot be reached) and requirements.txt, skips that on later
starts unless something changed, and starts the app.

Options: --share  --port N  --cpu  --update  --no-browser  --smoke-test  --install-desktop (Linux)  --help
Environment: FLUXSTUDIO_TORCH_INDEX (a torch wheel index URL, or "pypi"), FLUXSTUDIO_TORCH (the torch requirement,
default "torch"), FLUXSTUDIO_TORCH_INDEX_BASE (where the cu128/cpu indexes live), FLUXSTUDIO_HOME (data folder).

pip runs as a subprocess whose output goes to the log; only its exit code is read, never its stderr (pip writes
its warnings and retries there, and they are not failures).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import venv
from datetime import datetime
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent
VENV = APP_DIR / ".venv"
WINDOWS = os.name == "nt"
TORCH_INDEX_BASE = "https://download.pytorch.org/whl"
CUDA_INDEX, CPU_INDEX = "cu128", "cpu"
SUPPORTED = ((3, 10), (3, 12))
CREATED = ".fluxstudio-created"  # written once the venv is complete
INSTALLING = ".fluxstudio-installing"  # present while pip runs: left behind, it means an interrupted install
STAMP = ".fluxstudio-stamp"  # what was installed: requirements, torch requirement and index


class Fail(Exception):
    """One sentence for the person at the keyboard; the details are in the log."""


def data_dir() -> Path:
    if os.environ.get("FLUXSTUDIO_HOME"):
        return Path(os.environ["FLUXSTUDIO_HOME"]).expanduser()
    if WINDOWS:
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "FluxStudio"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "FluxStudio"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "FluxStudio"


LOG = data_dir() / "logs" / "launcher.log"


def log(text: str) -> None:
    with LOG.open("a", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")


def say(text: str) -> None:
    print(text, flush=True)
    log(text)


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if WINDOWS else "bin/python")


# -- the machine ---------------------------------------------------------------------------------------------


def has_nvidia_gpu() -> bool:
    """nvidia-smi on PATH that lists a GPU; on Windows, the display adapters in the registry as a fallback."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            if subprocess.run([smi, "-L"], capture_output=True, timeout=20, check=False).returncode == 0:
                return True
        except (OSError, subprocess.TimeoutExpired):
            pass
    return WINDOWS and _windows_nvidia_adapter()


def _windows_nvidia_adapter() -> bool:
    try:
        import winreg
    except ImportError:
        return False
    key = r"SYSTEM\CurrentControlSet\Control\Class\{4d36e968-e325-11ce-bfc1-08002be10318}"
    try:
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, key) as adapters:
            for i in range(64):
                try:
                    with winreg.OpenKey(adapters, f"{i:04d}") as adapter:
                        if "nvidia" in str(winreg.QueryValueEx(adapter, "DriverDesc")[0]).lower():
                            return True
                except OSError:
                    continue
    except OSError:
        return False
    return False


def torch_index(cpu: bool) -> str:
    """The wheel index for torch: FLUXSTUDIO_TORCH_INDEX, else PyTorch's CUDA or CPU index."""
    if os.environ.get("FLUXSTUDIO_TORCH_INDEX"):
        return os.environ["FLUXSTUDIO_TORCH_INDEX"]
    base = os.environ.get("FLUXSTUDIO_TORCH_INDEX_BASE", TORCH_INDEX_BASE).rstrip("/")
    return f"{base}/{CUDA_INDEX if not cpu and has_nvidia_gpu() else CPU_INDEX}"


# -- the virtual environment ---------------------------------------------------------------------------------


def ensure_venv() -> None:
    """A working .venv: made when missing; rebuilt when half-made or when an install was interrupted."""
    py = venv_python()
    healthy = (VENV / CREATED).exists() and py.exists() and _runs(py)
    if healthy and not (VENV / INSTALLING).exists():
        return
    if VENV.exists():
        reason = "an earlier installation was interrupted" if healthy else "it is incomplete"
        say(f"Rebuilding FluxStudio's environment in {VENV} ({reason})...")
        shutil.rmtree(VENV, ignore_errors=True)
        if VENV.exists():
            raise Fail(f"could not remove the old environment {VENV}; close other FluxStudio windows and try again.")
    else:
        say(f"Setting up FluxStudio in {VENV} (first start only)...")
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    except (OSError, subprocess.CalledProcessError) as exc:
        log(f"venv creation failed: {exc!r}")
        hint = " (Debian/Ubuntu: sudo apt install python3-venv)" if not WINDOWS else ""
        raise Fail(f"could not create a virtual environment{hint}.") from None
    (VENV / CREATED).write_text(sys.version, encoding="utf-8")


def _runs(py: Path) -> bool:
    try:
        return (
            subprocess.run([str(py), "-c", "import sys"], capture_output=True, timeout=60, check=False).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def wanted_stamp(torch: str, index: str) -> str:
    h = hashlib.sha256((APP_DIR / "requirements.txt").read_bytes())
    h.update(f"\n{torch} {index}".encode())
    return h.hexdigest()


def pip(args: list[str], what: str) -> bool:
    """Run pip with its output in the log and a progress line here; True when it exits 0."""
    cmd = [str(venv_python()), "-m", "pip", *args, "--disable-pip-version-check"]
    log(f"$ {subprocess.list2cmdline(cmd)}")
    with LOG.open("a", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        done = threading.Event()
        ticker = threading.Thread(target=_progress, args=(what, done), daemon=True)
        ticker.start()
        code = proc.wait()
        done.set()
        ticker.join()
    log(f"(exit {code})")
    return code == 0


def _progress(what: str, done: threading.Event) -> None:
    start = time.monotonic()
    interactive = sys.stdout.isatty()
    while not done.wait(1.0 if interactive else 30.0):
        line = f"  {what}... {time.monotonic() - start:.0f} s"
        print(f"\r{line}" if interactive else line, end="" if interactive else "\n", flush=True)
    if interactive:
        print(f"\r  {what}: done in {time.monotonic() - start:.0f} s", flush=True)


def install(update: bool, cpu: bool) -> None:
    torch = os.environ.get("FLUXSTUDIO_TORCH", "torch")
    index = torch_index(cpu)
    want = wanted_stamp(torch, index)
    stamp = VENV / STAMP
    if not update and stamp.exists() and stamp.read_text(encoding="utf-8").strip() == want:
        say("FluxStudio is up to date (requirements unchanged): skipping installation.")
        return
    say(
        f"Installing PyTorch ({torch} from {index}) and FluxStudio's requirements; the first time this downloads "
        f"about 3 GB with CUDA, 1 GB without. The details go to {LOG}"
    )
    stamp.unlink(missing_ok=True)
    (VENV / INSTALLING).write_text(datetime.now().isoformat(), encoding="utf-8")
    if index == "pypi":
        ok = pip(["install", torch], "Installing PyTorch")
    else:
        ok = pip(["install", "--timeout", "30", "--retries", "1", "--index-url", index, torch], "Installing PyTorch")
        if not ok and not os.environ.get("FLUXSTUDIO_TORCH_INDEX"):
            say("PyTorch's own index could not be used; installing PyTorch from PyPI instead.")
            ok = pip(["install", torch], "Installing PyTorch from PyPI")
    step = "PyTorch"
    if ok:
        step = "FluxStudio's requirements"
        ok = pip(["install", "-r", str(APP_DIR / "requirements.txt")], f"Installing {step}")
    (VENV / INSTALLING).unlink()  # pip ended on its own (a kill would leave the marker): the venv is consistent
    if not ok:
        raise Fail(f"installing {step} failed (network?). Start FluxStudio again to retry.{long_path_hint()}")
    stamp.write_text(want, encoding="utf-8")
    say("Installed.")


def long_path_hint() -> str:
    """On Windows, a pip failure under a deep folder is often the 260-character path limit: say what fixes it."""
    if not WINDOWS:
        return ""
    try:
        tail = LOG.read_text(encoding="utf-8", errors="replace")[-20000:]
    except OSError:
        tail = ""
    if "WinError 206" in tail or "path too long" in tail.lower() or len(str(VENV)) > 100:
        return (
            " Windows limits paths to 260 characters: turn on long paths (the LongPathsEnabled setting, "
            "https://learn.microsoft.com/windows/win32/fileio/maximum-file-path-limitation) or move FluxStudio "
            "to a shorter folder such as C:\\FluxStudio."
        )
    return ""


# -- the app -------------------------------------------------------------------------------------------------


def app_command(args: argparse.Namespace, browser: bool) -> list[str]:
    cmd = [str(venv_python()), str(APP_DIR / "app.py"), "--port", str(args.port)]
    return cmd + (["--share"] if args.share else []) + (["--inbrowser"] if browser else [])


def app_env() -> dict:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    if WINDOWS and not os.environ.get("HF_HUB_DISABLE_SYMLINKS_WARNING"):
        _symlink_note()
        env["HF_HUB_DISABLE_SYMLINKS_WARNING"] = "1"
    return env


def _symlink_note() -> None:
    """Windows without developer mode keeps no symlinks in the HF cache: say so once, not on every start."""
    marker = data_dir() / ".symlink-note-shown"
    if marker.exists():
        return
    say(
        "Note: without Windows developer mode, downloaded models take more disk (the Hugging Face cache cannot use "
        "symlinks). Everything still works."
    )
    marker.write_text("shown", encoding="utf-8")


def smoke_test(args: argparse.Namespace) -> None:
    url = f"http://127.0.0.1:{args.port}/"
    with LOG.open("a", encoding="utf-8") as out:
        proc = subprocess.Popen(app_command(args, browser=False), stdout=out, stderr=subprocess.STDOUT, env=app_env())
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise Fail("the app exited during start-up.")
                try:
                    if urllib.request.urlopen(url, timeout=2).status == 200:
                        say(f"FluxStudio answered on {url}")
                        return
                except OSError:
                    time.sleep(1)
            raise Fail(f"the app did not answer on port {args.port} within 3 minutes.")
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_app(args: argparse.Namespace) -> int:
    say(f"Starting FluxStudio on http://127.0.0.1:{args.port}/ (close this window to stop it).")
    proc = subprocess.Popen(
        app_command(args, browser=not args.no_browser), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=app_env()
    )
    try:
        for raw in proc.stdout:
            line = raw.decode("utf-8", errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            log(line)
    except KeyboardInterrupt:
        proc.terminate()
    code = proc.wait()
    if code not in (0, -2, 130) and code is not None:
        raise Fail("the app stopped with an error.")
    return 0


def install_desktop() -> None:
    apps = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "applications"
    apps.mkdir(parents=True, exist_ok=True)
    script = APP_DIR / "installers" / "linux" / "fluxstudio.sh"
    lines = []
    for line in (APP_DIR / "installers" / "linux" / "FluxStudio.desktop").read_text(encoding="utf-8").splitlines():
        if line.startswith("Exec="):
            line = f'Exec=bash "{script}"'
        elif line.startswith("Icon="):
            line = f"Icon={APP_DIR / 'fluxstudio' / 'ui' / 'assets' / 'icon.png'}"
        lines.append(line)
    entry = apps / "FluxStudio.desktop"
    entry.write_text("\n".join(lines) + "\n", encoding="utf-8")
    entry.chmod(0o755)
    print(f"Installed {entry}: FluxStudio is now in your applications menu.")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="FluxStudio", description="Set up FluxStudio (first start) and start it.")
    p.add_argument("--share", action="store_true", help="also share through a temporary public link (login required)")
    p.add_argument("--port", type=int, default=7860, help="port of the page (default 7860)")
    p.add_argument("--cpu", action="store_true", help="install the CPU build of PyTorch even with an NVIDIA GPU")
    p.add_argument("--update", action="store_true", help="reinstall PyTorch and the requirements")
    p.add_argument("--no-browser", action="store_true", help="do not open the browser")
    p.add_argument("--smoke-test", action="store_true", help="set up, check that the app answers, and stop")
    p.add_argument("--install-desktop", action="store_true", help="Linux: add FluxStudio to the applications menu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a console without UTF-8 must not fail on a path like Zoë
    args = parse(sys.argv[1:] if argv is None else argv)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    log(f"=== {datetime.now():%Y-%m-%d %H:%M:%S} FluxStudio launcher (Python {sys.version.split()[0]}) ===")
    try:
        if args.install_desktop:
            install_desktop()
            return 0
        if not (SUPPORTED[0] <= sys.version_info[:2] <= SUPPORTED[1]):
            raise Fail(f"FluxStudio needs Python 3.10, 3.11 or 3.12; this is {sys.version.split()[0]}.")
        ensure_venv()
        install(args.update, args.cpu)
        if args.smoke_test:
            smoke_test(args)
            return 0
        return run_app(args)
    except Fail as exc:
        print(f"\nFluxStudio could not start: {exc}\nThe full log is in: {LOG}", file=sys.stderr, flush=True)
        log(f"FAILED: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
