import os
import sys
from pathlib import Path

# Read by huggingface_hub at import: no test may reach the real Hub, and the fake one serves plain HTTP.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.pop("HF_TOKEN", None)

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import FLUX1_TINY, FLUX1_WIDE, write_model


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Point every user folder at a temp dir, so tests never touch the real ones."""
    home = tmp_path / "fshome"
    monkeypatch.setenv("FLUXSTUDIO_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return home


@pytest.fixture
def tiny_base(tmp_path) -> Path:
    return write_model(tmp_path / "base", FLUX1_TINY)


@pytest.fixture(scope="session")
def wide_base(tmp_path_factory) -> Path:
    """A width-3072 FLUX.1 model (1 double + 1 single block, ~0.5 B params): built once per session."""
    return write_model(tmp_path_factory.mktemp("wide") / "base", FLUX1_WIDE)


WIDE = {"wide_base", "wide_pipeline", "wide_folder", "wide_lora"}  # the width-3072 models: about 1 GB each


def pytest_collection_modifyitems(config, items):
    """Tests on the width-3072 models and browser tests are slow (left out of the fast lane: -m "not slow"); GPU
    tests run only where FLUXSTUDIO_GPU_TESTS=1 says there is a GPU."""
    skip = pytest.mark.skip(reason="needs a CUDA GPU (set FLUXSTUDIO_GPU_TESTS=1 on a GPU machine)")
    for item in items:
        if WIDE & set(getattr(item, "fixturenames", ())) or "browser" in item.keywords:
            item.add_marker(pytest.mark.slow)
        if "gpu" in item.keywords and not os.environ.get("FLUXSTUDIO_GPU_TESTS"):
            item.add_marker(skip)


def pytest_unconfigure(config):
    """Say what this run left in pytest's temp folders, once they were cleaned up (see the retention settings in
    pyproject.toml): a run should leave nothing big behind."""
    factory = getattr(config, "_tmp_path_factory", None)
    basetemp = getattr(factory, "_basetemp", None)
    if basetemp is None or hasattr(config, "workerinput"):  # the controller says it, for its workers too
        return
    root = Path(basetemp).parent
    left = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink()) if root.is_dir() else 0
    print(f"\npytest's temp folders ({root}) hold {left / 1e6:.1f} MB after this run", file=sys.stderr)
