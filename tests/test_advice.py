"""Precision advice over real card profiles, and the machine probe."""

from __future__ import annotations

import types

import pytest

from fluxstudio.advice.hardware import probe
from fluxstudio.advice.recommend import CARDS, MODELS, Card, Pick, recommend, recommend_here
from fluxstudio.formats import FORMATS

FLUX1, FLUX2 = MODELS["flux1"], MODELS["flux2-dev"]

CASES = [
    # card, model, expected precision, a fact the reason must name
    ("RTX 3060 12 GB", FLUX1, "nf4", "12 GB"),
    ("RTX 3080 10 GB", FLUX1, "nf4", "10 GB"),
    ("RTX 3090 24 GB", FLUX1, "nf4", "8.6"),  # bf16 too big, no native fp8
    ("RTX 4060 Ti 16 GB", FLUX1, "nf4", "16 GB"),  # fp8 needs ~17 GB with headroom
    ("RTX 4070 12 GB", FLUX1, "nf4", "12 GB"),
    ("RTX 4080 16 GB", FLUX1, "nf4", "16 GB"),
    ("RTX 4090 24 GB", FLUX1, "fp8", "8.9"),
    ("L4 24 GB", FLUX1, "fp8", "8.9"),
    ("RTX 5080 16 GB", FLUX1, "nf4", "16 GB"),
    ("RTX 5090 32 GB", FLUX1, "fp8", "12.0"),
    ("A100 40 GB", FLUX1, "bf16", "8.0"),
    ("A100 80 GB", FLUX1, "bf16", "8.0"),
    ("L40S 48 GB", FLUX1, "fp8", "8.9"),
    ("H100 80 GB", FLUX1, "fp8", "9.0"),
    ("H100 80 GB", FLUX2, "fp8", "9.0"),
    ("H200 141 GB", FLUX2, "fp8", "9.0"),
    ("A100 80 GB", FLUX2, "nf4", "8.0"),  # no fp8 compute, bf16 too big
    ("A100 40 GB", FLUX2, "nf4", "8.0"),
    ("RTX 4090 24 GB", FLUX2, "nf4", "24 GB"),
    ("RTX 5090 32 GB", FLUX2, "nf4", "32 GB"),
    ("L40S 48 GB", FLUX2, "nf4", "48 GB"),  # fp8 needs ~49 GB with headroom
    ("B200 180 GB", FLUX2, "fp8", "10.0"),
    ("RTX 2080 Ti 11 GB", FLUX1, "nf4", "7.5"),
    ("T4 16 GB", FLUX1, "nf4", "7.5"),
    ("Apple M-series 64 GB", FLUX1, "bf16", "64 GB"),
    ("RTX 4090 24 GB", MODELS["flux2-klein-9b"], "fp8", "8.9"),
]


@pytest.mark.parametrize("card,model,expected,fact", CASES, ids=[f"{c}-{m.key}" for c, m, _, _ in CASES])
def test_recommendation_per_card(card, model, expected, fact):
    rec = recommend(CARDS[card], model)
    assert rec.precision == expected, rec.reason
    assert fact in rec.reason, rec.reason
    assert {a.precision for a in rec.alternatives} == {"bf16", "fp8", "nf4"} - {expected}
    for alt in rec.alternatives:
        assert alt.why


def test_why_not_names_the_need_and_the_card():
    rec = recommend(CARDS["RTX 3060 12 GB"], FLUX1)
    bf16 = next(a for a in rec.alternatives if a.precision == "bf16")
    assert not bf16.fits and bf16.why == "needs ~27 GB; the RTX 3060 12 GB has 12 GB"
    fp8 = next(a for a in rec.alternatives if a.precision == "fp8")
    assert "8.9" in fp8.why and "8.6" in fp8.why


def test_fp8_native_cards_get_fp8_and_hear_what_it_buys():
    for card in ("H100 80 GB", "RTX 4090 24 GB", "RTX 5090 32 GB"):
        rec = recommend(CARDS[card], FLUX1)
        assert rec.precision == "fp8" and "natively" in rec.reason and "half the VRAM" in rec.reason
        assert "text encoders" in rec.reason and "ComfyUI and torchao" in rec.reason
    h100 = recommend(CARDS["H100 80 GB"], FLUX1)
    assert "bf16 fits too" in h100.reason
    bf16 = next(a for a in h100.alternatives if a.precision == "bf16")
    assert bf16.fits and "full quality" in bf16.why
    assert "bf16 fits too" not in recommend(CARDS["RTX 4090 24 GB"], FLUX1).reason  # 27 GB does not fit 24


ONE_FILE = [
    # card, model, the one-file pick, what is offered beside it, facts its reason must name
    # a ComfyUI file fitted to the card's room beside the uniform one, where the room is a tenth more but not bf16's
    (
        "RTX 4090 24 GB",
        FLUX1,
        "comfyui fp8",
        ["single-file fp8-scaled", "comfyui fit-fp8 in 21.00 GB"],
        ["multiplies it in fp8", "8.9", "Forge", "fp8 or bf16"],
    ),
    ("H100 80 GB", FLUX1, "comfyui fp8", ["single-file fp8-scaled"], ["multiplies it in fp8", "9.0"]),
    ("L40S 48 GB", FLUX1, "comfyui fp8", ["single-file fp8-scaled"], ["8.9"]),
    ("L4 24 GB", FLUX1, "comfyui fp8", ["single-file fp8-scaled", "comfyui fit-fp8 in 21.00 GB"], ["8.9"]),
    ("RTX 5090 32 GB", FLUX1, "comfyui nvfp4", ["comfyui fp8"], ["quarter", "12.0", "CUDA 13", "slower than fp8"]),
    ("B200 180 GB", FLUX2, "comfyui nvfp4", ["comfyui fp8"], ["10.0", "CUDA 13"]),
    ("RTX 5080 16 GB", FLUX1, "comfyui nvfp4", ["comfyui fit-nvfp4 in 13.00 GB"], ["~9.7 GB", "NVFP4, fp8, MXFP8"]),
    ("RTX 5070 12 GB", FLUX1, "comfyui nvfp4", ["comfyui fit-nvfp4 in 9.00 GB"], ["~9.7 GB"]),
    (
        "RTX 5060 8 GB",
        MODELS["flux2-klein-4b"],
        "comfyui nvfp4",
        ["comfyui fp8", "comfyui fit-nvfp4 in 4.00 GB"],
        ["12.0"],
    ),
    ("RTX 5060 8 GB", FLUX1, "gguf Q4_K_S", [], ["fits the RTX 5060"]),  # NVFP4 needs ~9.7 GB
    ("A100 80 GB", FLUX1, "single-file bf16", ["comfyui int8"], ["full quality", "INT8", "8.0", "30% faster"]),
    ("A100 40 GB", FLUX1, "single-file bf16", ["comfyui int8"], ["INT8"]),
    # a GGUF fitted to the VRAM less FLUX.1's 3 GB headroom (at most Q8_0's size), the one-type GGUF beside it
    (
        "RTX 3090 24 GB",
        FLUX1,
        "gguf fit in 12.64 GB",
        ["gguf Q5_K_S", "comfyui int8", "comfyui fit-int8 in 21.00 GB"],
        ["INT8", "8.6", "INT8 or bf16"],
    ),
    ("RTX 3060 12 GB", FLUX1, "gguf fit in 9.00 GB", ["gguf Q5_K_S"], ["12 GB less 3 GB"]),  # INT8's ~15 GB: no
    ("RTX 4080 16 GB", FLUX1, "gguf fit in 12.64 GB", ["gguf Q5_K_S"], ["GGUF"]),  # Ada: no NVFP4 nor INT8 path
    ("RTX 2080 Ti 11 GB", FLUX1, "gguf fit in 8.00 GB", ["gguf Q4_K_S"], ["11 GB less 3 GB"]),
]


@pytest.mark.parametrize("card,model,pick,also,facts", ONE_FILE, ids=[f"{c}-{m.key}" for c, m, *_ in ONE_FILE])
def test_the_one_file_pick_is_what_the_card_multiplies_fastest_in_comfyui(card, model, pick, also, facts):
    rec = recommend(CARDS[card], model)
    assert str(rec.one_file) == pick and [str(p) for p in rec.one_file_also] == also, rec.one_file_why
    for fact in facts:
        assert fact in rec.one_file_why, rec.one_file_why
    for p in rec.one_file_picks:  # every pick is one the format offers (a size to fit, where it fits sizes)
        fmt = FORMATS[p.format]
        assert p.precision in fmt.precisions or (p.precision in fmt.fit_keys and p.fit_bytes > 0)


def test_a100_gets_bf16_and_small_cards_nf4_with_a_gguf_for_one_file_users():
    a100 = recommend(CARDS["A100 80 GB"], FLUX1)
    assert a100.precision == "bf16" and "compute 8.0" in a100.reason and a100.one_file == Pick("single-file", "bf16")
    for card in ("RTX 3060 12 GB", "RTX 3080 10 GB", "RTX 4070 12 GB", "RTX 2080 Ti 11 GB"):
        rec = recommend(CARDS[card], FLUX1)
        assert rec.precision == "nf4", card
        assert rec.one_file.precision == "fit", (card, rec.one_file)
        assert rec.one_file_also[0] in (Pick("gguf", "Q5_K_S"), Pick("gguf", "Q4_K_S")), (card, rec.one_file_also)
    assert recommend(CARDS["RTX 3060 12 GB"], FLUX1).one_file == Pick("gguf", "fit", 9 * 10**9)  # 12 GB less 3 GB
    assert recommend(CARDS["RTX 3080 10 GB"], FLUX1).one_file_also == (Pick("gguf", "Q4_K_S"),)
    # 8 GB less 3 GB is less than Q3_K for every weight (~5.1 GB): the one-type file alone
    assert recommend(CARDS["RTX 5060 8 GB"], FLUX1).one_file == Pick("gguf", "Q4_K_S")


def test_model_size_changes_the_advice():
    assert recommend(CARDS["A100 80 GB"], FLUX1).precision == "bf16"
    assert recommend(CARDS["A100 80 GB"], FLUX2).precision != "bf16"
    assert MODELS["flux1"].weight_bytes("bf16") == pytest.approx(23.8e9, rel=0.01)
    assert MODELS["flux1"].weight_bytes("nf4") == pytest.approx(6.7e9, rel=0.01)


def test_nothing_fits_means_offload():
    rec = recommend(Card("Tiny 4 GB", "NVIDIA CUDA", (8, 9), 4), FLUX1)
    assert rec.precision == "nf4" and "offload" in rec.reason


def test_cpu_only_explains_and_asks_for_a_target():
    rec = recommend(None, FLUX1)
    assert "No NVIDIA or AMD GPU here" in rec.reason and "Pick the card" in rec.reason


def test_an_apple_machine_is_asked_for_its_target_too():
    from fluxstudio.advice.hardware import Accelerator, HardwareInfo

    mac = HardwareInfo(
        "Darwin 24",
        "Apple M3 Max",
        16,
        64 * 10**9,
        40 * 10**9,
        500 * 10**9,
        "/Users/x",
        [Accelerator(kind="Apple MPS", name="Apple arm64 GPU", vram_total_bytes=64 * 10**9, bf16=True)],
    )
    rec = recommend_here(mac, FLUX1)
    assert "Pick the card" in rec.reason


def test_probe_on_this_machine(tmp_path):
    hw = probe(output_dir=tmp_path / "not" / "yet")
    assert hw.ram_total_bytes > 1e9 and 0 < hw.ram_available_bytes <= hw.ram_total_bytes
    assert hw.disk_free_bytes > 0 and hw.disk_path == str(tmp_path)
    assert hw.cpu and hw.cpu_cores >= 1 and hw.os
    rec = recommend_here(hw, FLUX1)
    assert rec.precision in ("bf16", "fp8", "nf4") and rec.reason


def test_probe_survives_a_broken_cuda(tmp_path):
    def boom(*a, **k):
        raise RuntimeError("CUDA driver initialization failed")

    broken = types.SimpleNamespace(
        cuda=types.SimpleNamespace(is_available=boom, device_count=boom),
        version=types.SimpleNamespace(cuda="12.8", hip=None),
        backends=types.SimpleNamespace(mps=types.SimpleNamespace(is_available=boom)),
    )
    hw = probe(output_dir=tmp_path, torch_module=broken)
    assert any("CUDA could not be queried" in n for n in hw.notes)
    assert hw.ram_total_bytes > 0


def test_probe_survives_failing_device_queries(tmp_path):
    def boom(*a, **k):
        raise RuntimeError("device lost")

    half = types.SimpleNamespace(
        cuda=types.SimpleNamespace(
            is_available=lambda: True, device_count=lambda: 1, get_device_properties=boom, mem_get_info=boom
        ),
        version=types.SimpleNamespace(cuda="12.8", hip=None),
        backends=types.SimpleNamespace(),
    )
    hw = probe(output_dir=tmp_path, torch_module=half, run=boom)
    assert hw.accelerators == [] and any("GPU 0 could not be read" in n for n in hw.notes)


@pytest.mark.gpu
def test_real_gpu_probe_matches_nvidia_smi(tmp_path):
    import subprocess

    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()[0]
    name, total_mib, cap = (p.strip() for p in out.split(","))
    gpu = probe(output_dir=tmp_path).accelerators[0]
    assert gpu.kind == "NVIDIA CUDA" and gpu.name == name
    assert gpu.capability == tuple(int(x) for x in cap.split("."))
    assert abs(gpu.vram_total_bytes - int(total_mib) * 2**20) / (int(total_mib) * 2**20) < 0.05
    assert gpu.fp8_compute == (gpu.capability >= (8, 9)) and gpu.bf16


@pytest.mark.parametrize(
    "card,transformer,t5",
    [
        ("RTX 5090 32 GB", "fp8", "bf16"),  # room for T5 in bf16 beside the fp8 transformer
        ("RTX 4090 24 GB", "fp8", "fp8"),
        ("RTX 4080 16 GB", "nf4", "fp8"),
        ("RTX 4070 12 GB", "nf4", "nf4"),  # 8-12 GB cards get T5 in NF4 too
        ("A100 80 GB", "bf16", "bf16"),
        ("Apple M-series 32 GB", "bf16", "fp8"),  # no bitsandbytes: never NF4
    ],
)
def test_the_advice_picks_t5s_precision_for_a_pipeline_export(card, transformer, t5):
    rec = recommend(CARDS[card], MODELS["flux1"])
    assert (rec.precision, rec.text_encoder) == (transformer, t5)


@pytest.mark.parametrize("card", sorted(CARDS))
def test_the_reason_does_not_repeat_the_lines_on_the_other_precisions(card):
    rec = recommend(CARDS[card], FLUX1)
    for alt in rec.alternatives:
        assert alt.why not in rec.reason and not alt.why.startswith(alt.precision), (rec.reason, alt)
