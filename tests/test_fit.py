"""Fitting a GGUF file to a size: the measure, its sampling, the choice, and whole builds (engine/fit.py)."""

from __future__ import annotations

import itertools
import json
import random

import gguf
import pytest
import torch
from helpers import FLUX1_TINY, FLUX1_WIDE, linear_shapes, peft_lora, write_model

from fluxstudio import cli
from fluxstudio.engine import fit
from fluxstudio.engine.retention import change_size
from fluxstudio.errors import BadInputError
from fluxstudio.flows.build import build, plan_build
from fluxstudio.flows.request import BuildRequest, LoraRef
from fluxstudio.formats import FORMATS, Settings
from fluxstudio.quant import get

CANDIDATES = [get(k) for k in ("F16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "IQ4_XS", "Q3_K")]


def test_the_hull_drops_choices_that_never_pay():
    cs = [fit.Choice("a", 10, 9.0), fit.Choice("b", 20, 8.9), fit.Choice("c", 30, 1.0), fit.Choice("d", 40, 2.0)]
    assert [c.key for c in fit.hull(cs)] == ["a", "c"]  # b lies above the chord a-c; d is larger and worse


def test_the_choice_stays_within_the_budget_and_is_near_the_best_possible():
    rng = random.Random(0)
    for _ in range(200):
        options = {}
        for t in range(4):
            sizes = sorted(rng.sample(range(5, 60), 4))
            errors = sorted((rng.uniform(0, 100) for _ in sizes), reverse=True)
            options[f"t{t}"] = [fit.Choice(f"q{i}", s, e) for i, (s, e) in enumerate(zip(sizes, errors, strict=True))]
        budget = fit.smallest(options) + rng.randrange(0, 120)
        mix = fit.choose(options, budget)
        assert sum(c.nbytes for c in mix.values()) <= budget
        best = min(
            sum(c.error for c in combo)
            for combo in itertools.product(*options.values())
            if sum(c.nbytes for c in combo) <= budget
        )
        largest_step = max(max(c.error for c in cs) - min(c.error for c in cs) for cs in options.values())
        got = sum(c.error for c in mix.values())
        assert best <= got <= best + largest_step  # the greedy on the hulls is optimal but for one last step
    with pytest.raises(ValueError):
        fit.choose(options, fit.smallest(options) - 1)


def test_keeping_the_lora_weighs_its_term_up_just_enough():
    """Two tensors: the measure alone keeps the model's tensor high; asked to keep the LoRA's error within a bound,
    the LoRA's tensor goes high instead, within the same budget."""
    terms = {
        "model": {"lo": (0.6, 0.0), "hi": (0.1, 0.0)},
        "lora": {"lo": (0.1, 0.3), "hi": (0.05, 0.05)},
    }
    nbytes = {n: {"lo": 10, "hi": 20} for n in terms}
    mix, weight = fit.choose_keeping(terms, nbytes, 30)
    assert (mix["model"].key, mix["lora"].key, weight) == ("hi", "lo", 1.0)
    mix, weight = fit.choose_keeping(terms, nbytes, 30, lora_at_most=0.1)
    assert (mix["model"].key, mix["lora"].key) == ("lo", "hi") and weight > 1
    mix, weight = fit.choose_keeping(terms, nbytes, 20, lora_at_most=0.01)  # cannot: the most it can keep
    assert mix["lora"].key == "lo" and weight == pytest.approx(fit.MAX_LORA_WEIGHT, rel=0.01)


def test_sample_rows_estimate_each_types_error_of_the_whole_tensor():
    """Heavy-tailed rows of unequal scales: 256 sampled rows of 3072 against every row, for every candidate: within
    3% for the layer's error, within 25% for the LoRA term (16 input directions on a third of the rows: fewer
    samples, so coarser; F16's error is bf16's subnormals only, under 1e-11 of Q8_0's)."""
    g = torch.Generator().manual_seed(0)
    scales = torch.exp(torch.randn(3072, 1, generator=g) * 0.5) * 0.02
    chi2 = torch.randn(4, 3072, 3072, generator=g).square().sum(0)
    t = torch.randn(3072, 3072, generator=g) / (chi2 / 4).sqrt()  # Student's t with 4 degrees of freedom
    w = (t * scales).to(torch.bfloat16)
    lora = [fit.LoraInputs(0, 1024, torch.randn(16, 3072, generator=g), 1.0)]
    sampled = fit.measure("w", w, CANDIDATES, lora, torch.bfloat16).errors
    whole = fit.measure("w", w, CANDIDATES, lora, torch.bfloat16, count=3072).errors
    for key in whole:
        if key == "F16":
            assert max(sampled[key] + whole[key]) < 1e-11 * whole["Q8_0"][0]
            continue
        for term, within in ((0, 0.03), (1, 0.25)):
            print(
                f"{key}, {('layer', 'LoRA')[term]}: sampled {sampled[key][term]:.4g}, every row {whole[key][term]:.4g}"
            )
            assert sampled[key][term] == pytest.approx(whole[key][term], rel=within)


def test_the_lora_term_is_the_relative_error_where_the_lora_acts_times_its_change():
    """Two layers with the same weights and error, one with a LoRA change four times the other's: its LoRA term is
    four times as large, and |ΔW|² is computed without the product."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(512, 1024, generator=g) * 0.02
    up, down = torch.randn(512, 8, generator=g) * 0.01, torch.randn(8, 1024, generator=g) * 0.01
    change = change_size([up], [down])
    assert change == pytest.approx(float((up @ down).square().sum()), rel=1e-4)
    q4k = [get("Q4_K")]
    one = fit.measure("w", w, q4k, [fit.LoraInputs(0, 512, down, change)], count=512)
    four = fit.measure("w", w, q4k, [fit.LoraInputs(0, 512, down, 4 * change)], count=512)
    (layer, lost), (layer4, lost4) = one.errors["Q4_K"], four.errors["Q4_K"]
    assert layer == layer4 and lost4 == pytest.approx(4 * lost)
    assert lost / change == pytest.approx(layer / one.size, rel=0.3)  # the relative error, on the LoRA's inputs


def _q4ks_budget(base, loras):
    planned = plan_build(base, loras, FORMATS["gguf"], "Q4_K_S", Settings())
    writer = planned.writer
    return planned.need_bytes(base), sum(writer.types[n].nbytes(s) for n, s in writer.shapes.items())


def _data_bytes(path):
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def test_a_budget_below_the_smallest_type_is_one_sentence_and_no_file(rows256, tmp_path, capsys):
    out = tmp_path / "outputs" / "fit.gguf"
    with pytest.raises(BadInputError) as small:
        build(BuildRequest(str(rows256), (), "fit", out, format="gguf", fit_bytes=10**6))
    print(small.value.message, small.value.hint)
    assert small.value.message.count(". ") == 0 and "even Q3_K for every weight" in small.value.message
    assert small.value.hint.startswith("The smallest type, Q2_K, makes")
    assert not out.parent.exists() or not list(out.parent.iterdir())
    # between Q2_K's size and the fitted types' least: Q2_K is named as the type that fits
    q2k = plan_build(rows256, [], FORMATS["gguf"], "Q2_K", Settings()).need_bytes(tmp_path)
    code = cli.main(["fuse", "--base", str(rows256), "--format", "gguf", "--fit", f"{q2k}B", "--out", str(out)])
    err = capsys.readouterr().err
    print(err)
    assert code == 2 and "Q2_K makes" in err and "choose it" in err and "Traceback" not in err
    assert not out.parent.exists() or not list(out.parent.iterdir())
    with pytest.raises(BadInputError, match="GGUF and ComfyUI-native files are fitted to a size, not the single-file"):
        build(BuildRequest(str(rows256), (), "fit", out, format="single-file", fit_bytes=10**9))
    with pytest.raises(BadInputError, match="Q4_K_S is one precision for every weight"):
        build(BuildRequest(str(rows256), (), "Q4_K_S", out, format="gguf", fit_bytes=10**9))


def test_a_fitted_file_at_q4_k_s_size_is_a_mix_with_less_error_than_q4_k_s(rows256, attn_lora, tmp_path):
    """A LoRA on the attention layers: the file fitted to uniform Q4_K_S's size holds no more tensor data than
    Q4_K_S, mixes types, has less error by the measure and keeps the LoRA within Q5_K_S's term (bench/fit.py
    compares it with Q4_K_S, Q4_K_M and Q5_K_S on the 1.3 B model, builds and retention scores included)."""
    loras = [(attn_lora, 1.0)]
    budget, q4ks_data = _q4ks_budget(rows256, loras)
    out = tmp_path / "fit.gguf"
    fitted = build(BuildRequest(str(rows256), (LoraRef(str(attn_lora)),), "fit", out, format="gguf", fit_bytes=budget))
    mix = fitted.fit
    print("\n".join(fit.describe(mix)), f"\nLoRA kept {fitted.lora_retained}")
    assert _data_bytes(out) <= q4ks_data and out.stat().st_size <= budget
    assert mix["error"] < mix["presets"]["Q4_K_S"]["error"]
    assert mix["lora_as"] == "Q5_K_S" and mix["lora_error"] <= mix["presets"]["Q5_K_S"]["lora_error"]
    reader = gguf.GGUFReader(str(out))
    assert len({t.tensor_type.name for t in reader.tensors} & set(fit_types())) >= 2  # a mix, read back by gguf
    most = max(mix["types"], key=lambda k: mix["types"][k]["params"])
    ftype = {"Q5_K": "Q5_K_S", "Q4_K": "Q4_K_S", "Q3_K": "Q3_K_S"}.get(most, most)
    assert reader.fields["general.file_type"].parts[-1][0] == gguf.LlamaFileType[f"MOSTLY_{ftype}"]
    assert fitted.stage_seconds["measure"] > 0 and fitted.precision == "fit"
    embedded = json.loads(bytes(reader.fields["fluxstudio"].parts[-1]).decode())
    assert embedded["fit"]["types"] == mix["types"]  # the manifest carries the mix


@pytest.mark.slow
def test_on_the_1_3_b_model_the_file_fitted_to_q4_k_s_size_beats_q4_k_s_and_q4_k_m_and_keeps_the_lora_as_q5_k_s(
    tmp_path, capsys
):
    """FLUX.1's width, 2 double + 4 single blocks (1.3 B params), its layers at scales spread over 0.01-0.04 as a
    trained model's differ, a rank-16 LoRA on the attention layers: `--fit` at uniform Q4_K_S's size has a lower
    measure than Q4_K_S and Q4_K_M (the measure of both from the same pass) and keeps the LoRA at least as Q5_K_S does
    by the retention score of the built files (bench/fit.py adds layers at one scale, where it beats Q4_K_S only)."""
    base = write_model(tmp_path / "base", dict(FLUX1_WIDE, num_layers=2, num_single_layers=4), spread=1.0)
    lora = peft_lora(tmp_path / "attn.safetensors", linear_shapes(base, ("attn.",)), rank=16, strength=0.03)
    budget, _ = _q4ks_budget(base, [(lora, 1.0)])
    out = tmp_path / "outputs" / "fit.gguf"
    argv = ["fuse", "--base", str(base), "--lora", str(lora), "--format", "gguf", "--fit", f"{budget}B", "--out"]
    assert cli.main([*argv, str(out)]) == 0
    report = capsys.readouterr().out
    size = out.stat().st_size
    mix = json.loads(bytes(gguf.GGUFReader(str(out)).fields["fluxstudio"].parts[-1]).decode())
    fitted_kept = mix["lora_retained"]
    out.unlink()
    q5ks = build(BuildRequest(str(base), (LoraRef(str(lora)),), "Q5_K_S", tmp_path / "q5ks.gguf", format="gguf"))
    presets = mix["fit"]["presets"]
    with capsys.disabled():
        print(f"\n{report}")
        for key in ("Q4_K_S", "Q4_K_M", "Q5_K_S"):
            print(f"{key}: {presets[key]['bytes'] / 1e6:.1f} MB, measure {presets[key]['error']:.5f}")
        print(f"fit: {size / 1e6:.1f} MB, measure {mix['fit']['error']:.5f}, LoRA kept {fitted_kept:.5f}")
        print(f"Q5_K_S: {q5ks.output_bytes / 1e6:.1f} MB, LoRA kept {q5ks.lora_retained:.5f}")
    assert size <= budget
    assert mix["fit"]["error"] < presets["Q4_K_S"]["error"] and mix["fit"]["error"] < presets["Q4_K_M"]["error"]
    assert fitted_kept >= q5ks.lora_retained


def fit_types():
    return ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "IQ4_XS", "Q3_K")


@pytest.fixture
def rows256(tmp_path):
    """A small FLUX.1 whose rows are multiples of 256 (every candidate fits), its layers of unequal scales."""
    return write_model(tmp_path / "base", dict(FLUX1_TINY, attention_head_dim=128), spread=1.0)


@pytest.fixture
def attn_lora(rows256, tmp_path):
    return peft_lora(tmp_path / "attn.safetensors", linear_shapes(rows256, ("attn.",)), rank=16, strength=0.03)
