"""Every bad input ends in one clear sentence, a non-zero exit, and no output or temp folder left behind."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FLUX1_TINY, FLUX2_TINY, linear_shapes, peft_lora, write_model
from safetensors.torch import save_file

from fluxstudio.errors import (
    BadInputError,
    CancelledError,
    DiskSpaceError,
    LoraMismatchError,
    NumericError,
    OutputError,
)
from fluxstudio.flows.build import build
from fluxstudio.flows.request import BuildRequest, LoraRef
from fluxstudio.progress import CancelToken, Run

ROOT = Path(__file__).resolve().parent.parent


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.startswith("out"))


def attempt(base, loras, out, error, match, **kw):
    run = Run(kw.pop("progress", None), kw.pop("cancel", None))
    run_kw = {k: kw.pop(k) for k in ("free_bytes",) if k in kw}
    req = BuildRequest(str(base), tuple(LoraRef(str(p), s) for p, s in loras), kw.pop("precision", "nf4"), out, **kw)
    with pytest.raises(error, match=match) as info:
        build(req, run, **run_kw)
    assert "Traceback" not in str(info.value)
    return info.value


@pytest.fixture
def good_lora(tiny_base, tmp_path):
    return peft_lora(tmp_path / "good.safetensors", linear_shapes(tiny_base))


@pytest.fixture
def work(tmp_path):
    d = tmp_path / "outputs"
    d.mkdir()
    return d


def test_missing_lora(tiny_base, work, tmp_path):
    missing = tmp_path / "nope.safetensors"
    err = attempt(tiny_base, [(missing, 1)], work / "out", BadInputError, "does not exist")
    assert str(missing) in str(err)  # the whole path, on this machine (a shared session cuts it: test_ui_http)
    assert leftovers(work) == []
    from fluxstudio.engine.safefile import read_header

    with pytest.raises(BadInputError) as info:
        read_header(missing, "LoRA file")
    assert str(missing) in str(info.value) and info.value.without_paths().startswith("The LoRA file nope.safetensors")


def test_a_missing_base_is_said_before_a_name_clash(tmp_path, work):
    (work / "out").mkdir()
    err = attempt(tmp_path / "no-such-base", [], work / "out", BadInputError, "does not exist", precision="bf16")
    assert "base model folder" in str(err) and "already exists" not in str(err)


def test_truncated_lora(tiny_base, good_lora, work, tmp_path):
    data = good_lora.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) - 1000])
    attempt(tiny_base, [(bad, 1)], work / "out", BadInputError, "truncated")
    assert leftovers(work) == []


def test_garbage_lora(tiny_base, work, tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"this is not a model at all" * 100)
    attempt(tiny_base, [(bad, 1)], work / "out", BadInputError, "not a valid safetensors file")
    assert leftovers(work) == []


@pytest.mark.parametrize("name", ["lora.ckpt", "lora.bin", "renamed.safetensors"])
def test_pickle_is_refused_without_unpickling(tiny_base, work, tmp_path, name):
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / name
    if name.endswith(".bin"):
        torch.save({"x": torch.zeros(2), "boom": Boom()}, path)
    else:
        path.write_bytes(pickle.dumps({"boom": Boom()}, protocol=4))
    err = attempt(tiny_base, [(path, 1)], work / "out", BadInputError, "pickle checkpoint")
    assert "can run code" in err.hint
    assert not marker.exists()
    assert leftovers(work) == []


def test_nan_in_lora(tiny_base, work, tmp_path):
    shapes = linear_shapes(tiny_base)
    path = peft_lora(tmp_path / "nan.safetensors", shapes)
    from safetensors.torch import load_file

    sd = load_file(str(path))
    key = next(iter(sd))
    sd[key][0, 0] = float("nan")
    save_file(sd, str(path))
    attempt(tiny_base, [(path, 1)], work / "out", NumericError, "NaN or Inf")
    assert leftovers(work) == []


def test_inf_in_fused_result(tiny_base, work, tmp_path):
    shapes = linear_shapes(tiny_base)
    name, (out_f, in_f) = next(iter(sorted(shapes.items())))
    huge = tmp_path / "huge.safetensors"  # finite in bf16, but B·A overflows float32
    save_file(
        {
            f"transformer.{name}.lora_A.weight": torch.full((8, in_f), 1e20, dtype=torch.bfloat16),
            f"transformer.{name}.lora_B.weight": torch.full((out_f, 8), 1e20, dtype=torch.bfloat16),
        },
        str(huge),
    )
    attempt(tiny_base, [(huge, 1)], work / "out", NumericError, "Fusing gave NaN or Inf")
    assert leftovers(work) == []


def test_lora_for_another_family(tiny_base, work, tmp_path):
    f2 = write_model(tmp_path / "f2", FLUX2_TINY, class_name="Flux2Transformer2DModel")
    lora = peft_lora(tmp_path / "f2.safetensors", linear_shapes(f2, contains=("to_qkv_mlp_proj", "ff.linear")))
    err = attempt(tiny_base, [(lora, 1)], work / "out", LoraMismatchError, "match nothing in this FLUX.1 dev base")
    assert "made for FLUX.1" in err.hint
    assert leftovers(work) == []


def test_unmatched_modules_error_then_ignored(tiny_base, work, tmp_path):
    shapes = linear_shapes(tiny_base)
    shapes["transformer_blocks.7.attn.to_q"] = (128, 128)
    lora = peft_lora(tmp_path / "extra.safetensors", shapes)
    err = attempt(tiny_base, [(lora, 1)], work / "out", LoraMismatchError, "transformer_blocks.7.attn.to_q")
    assert "ignore unmatched" in err.hint
    assert leftovers(work) == []
    result = build(BuildRequest(str(tiny_base), (LoraRef(str(lora)),), "bf16", work / "out", ignore_unmatched=True))
    assert any("ignored 1 unmatched" in n for n in result.notes)


def test_rank_mismatch(tiny_base, work, tmp_path):
    sd = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(8, 128),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(128, 4),
    }
    path = tmp_path / "rank.safetensors"
    save_file(sd, str(path))
    attempt(tiny_base, [(path, 1)], work / "out", LoraMismatchError, "do not fit together")
    assert leftovers(work) == []


def test_output_exists_refused_unless_overwrite(tiny_base, good_lora, work):
    out = work / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    attempt(tiny_base, [(good_lora, 1)], out, OutputError, "already exists")
    assert (out / "keep.txt").read_text() == "mine"
    build(BuildRequest(str(tiny_base), (LoraRef(str(good_lora)),), "bf16", out, overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "fluxstudio.json").exists()
    assert leftovers(work) == ["out"]


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_output_overlapping_the_base(tiny_base, good_lora, where):
    out = {"same": tiny_base, "inside": tiny_base / "out", "contains": tiny_base.parent}[where]
    before = sorted(p.name for p in tiny_base.iterdir())
    attempt(tiny_base, [(good_lora, 1)], out, OutputError, "overlaps an input", overwrite=True)
    assert sorted(p.name for p in tiny_base.iterdir()) == before


def test_not_enough_disk_is_checked_before_starting(tiny_base, good_lora, work):
    seen = []
    err = attempt(
        tiny_base,
        [(good_lora, 1)],
        work / "out",
        DiskSpaceError,
        "Not enough free disk",
        free_bytes=lambda p: seen.append(p) or 1_000_000,
        progress=lambda ev: seen.append(ev.stage),
    )
    assert "fuse" not in seen and err.hint
    assert leftovers(work) == []


def test_cancel_leaves_nothing(tiny_base, good_lora, work):
    token = CancelToken()

    def progress(ev):
        if ev.stage == "fuse" and ev.done >= 3:
            token.cancel()

    attempt(tiny_base, [(good_lora, 1)], work / "out", CancelledError, "Cancelled", cancel=token, progress=progress)
    assert leftovers(work) == []


def test_unknown_model_class(tmp_path, good_lora, work):
    base = write_model(tmp_path / "sd3", FLUX1_TINY)
    cfg = (base / "config.json").read_text().replace("FluxTransformer2DModel", "SD3Transformer2DModel")
    (base / "config.json").write_text(cfg)
    err = attempt(base, [(good_lora, 1)], work / "out", BadInputError, "SD3Transformer2DModel")
    assert "FluxTransformer2DModel" in err.hint and "Flux2Transformer2DModel" in err.hint


def test_already_quantized_base_is_refused(tiny_base, good_lora, work):
    build(BuildRequest(str(tiny_base), (), "nf4", work / "q"))
    attempt(work / "q", [(good_lora, 1)], work / "out", BadInputError, "already quantized")


def test_weights_that_do_not_match_the_config(tiny_base, good_lora, work):
    cfg = (tiny_base / "config.json").read_text().replace('"num_single_layers": 2', '"num_single_layers": 3')
    (tiny_base / "config.json").write_text(cfg)
    attempt(tiny_base, [(good_lora, 1)], work / "out", BadInputError, "do not match its config")


def test_cli_prints_one_sentence_and_exits_non_zero(tiny_base, tmp_path, work, capsys):
    from fluxstudio.cli import main

    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x00" * 10)
    code = main(
        ["fuse", "--base", str(tiny_base), "--lora", str(bad), "--precision", "nf4", "--out", str(work / "out")]
    )
    stderr = capsys.readouterr().err
    assert code == 2  # cli.EXIT_CODES: bad input
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "x.safetensors" in errors[0]
    assert leftovers(work) == []


def test_every_error_raised_has_a_hint_and_an_exit_code():
    """Read every `raise SomeError(...)` in the package: each gives a non-empty hint (what to do next), and each
    error class has its own non-zero exit code in the CLI's table."""
    import ast

    from fluxstudio import errors
    from fluxstudio.cli import EXIT_CODES, exit_code

    classes = {n: getattr(errors, n) for n in dir(errors) if n.endswith("Error")}
    missing, seen = [], set()
    for f in sorted((ROOT / "fluxstudio").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in classes:
                    seen.add(name)
                    hint = (
                        node.args[1]
                        if len(node.args) > 1
                        else next((k.value for k in node.keywords if k.arg == "hint"), None)
                    )
                    if hint is None or (isinstance(hint, ast.Constant) and not str(hint.value).strip()):
                        missing.append(f"{f.name}:{node.lineno} {name}")
    assert len(seen) >= 6 and not missing, missing
    codes = {cls: exit_code(cls("x", "y")) for cls in classes.values()}
    assert all(code != 0 for code in codes.values())
    assert codes[errors.LoraMismatchError] == codes[errors.BadInputError] == 2 and codes[errors.CancelledError] == 130
    top = [cls for cls, _ in EXIT_CODES]
    assert len({code for _, code in EXIT_CODES}) == len(top)  # one code per listed class


def test_a_killed_build_leaves_a_partial_that_the_next_build_reclaims(wide_base, tmp_path):
    """SIGKILL a CLI build mid-write: its hidden partial folder stays; the next build start (any name) removes it."""
    import signal
    import time

    out = tmp_path / "outs"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fluxstudio",
            "fuse",
            "--base",
            str(wide_base),
            "--precision",
            "bf16",
            "--out",
            str(out / "first"),
            "--quiet",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    partial = []
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [p for p in out.glob(".first.partial-*") if any(f.stat().st_size > 10_000_000 for f in p.iterdir())]
        if partial:
            break
        time.sleep(0.05)
    assert partial, "the build finished or failed before it could be killed mid-write"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert partial[0].exists() and not (out / "first").exists()
    from fluxstudio.library import list_outputs

    assert list_outputs(out) == []  # the library never lists it
    tiny = write_model(tmp_path / "tiny", FLUX1_TINY)
    build(BuildRequest(str(tiny), (), "bf16", out / "second"))
    assert [p.name for p in out.iterdir()] == ["second"]


def test_a_running_builds_partial_is_left_alone(tmp_path):
    from fluxstudio.engine import partials

    mine = tmp_path / ".x.partial-1234"
    mine.mkdir()
    partials.mark(mine)
    dead = tmp_path / ".y.partial-5678"
    dead.mkdir()
    (dead / partials.OWNER).write_text("999999 12.0")  # no such process
    (dead / "shard").write_bytes(b"\0" * 1000)
    legacy = tmp_path / ".z.old-abcd"  # no owner file at all
    legacy.mkdir()
    assert partials.reclaim(tmp_path) == 1000 + len("999999 12.0")
    assert [p.name for p in tmp_path.iterdir()] == [".x.partial-1234"]
