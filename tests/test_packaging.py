"""FluxStudio installs like a Python project: `pip install .` into a fresh venv gives the `fluxstudio` command, with
the app's assets inside the package, and pyproject.toml asks for what requirements.txt (the launchers') asks for."""

from __future__ import annotations

import os
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def test_pyproject_asks_for_what_requirements_txt_asks_for():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    required = [
        line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    ]
    assert declared == [r for r in required if r]


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_gives_the_fluxstudio_command(tmp_path):
    """The new venv sees the test environment's packages (a .pth file), which tests/run.sh installed from
    requirements.txt, the same list as pyproject's (above): pip installs FluxStudio alone, from its sources."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / ("Scripts" if os.name == "nt" else "bin") / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "tested-packages.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [str(ROOT)], check=True, timeout=900)
    assert not (Path(site) / "torch").exists()  # what it needed was there: only FluxStudio was installed
    exe = env_dir / ("Scripts" if os.name == "nt" else "bin") / "fluxstudio"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"FLUXSTUDIO_HOME": str(tmp_path / "home")}
    run = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True, "timeout": 600}  # away from the checkout
    helped = subprocess.run([str(exe), "--help"], **run, check=False)
    assert helped.returncode == 0 and "fuse" in helped.stdout
    built = subprocess.run(
        [str(exe), "fuse", "--base", "demo", "--lora", "demo", "--precision", "fp8", "--out", str(tmp_path / "x")],
        **run,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "x" / "fluxstudio.json").exists() and "LoRA effect kept" in built.stdout
    where = subprocess.run(
        [str(py), "-c", "import fluxstudio, pathlib; print(pathlib.Path(fluxstudio.__file__).parent)"],
        **run,
        check=False,
    ).stdout.strip()
    assert Path(where).parent.name == "site-packages" and Path(where, "ui", "assets", "style.css").is_file()
