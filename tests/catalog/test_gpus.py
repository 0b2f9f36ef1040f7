"""The GPU catalog (profiles/gpus.json) and memplan.catalog.gpus: resolution, budgets, overrides, detection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memplan.catalog import paths as catalog
from memplan.catalog.gpus import (
    GENERIC_CUDA_CONTEXT_BYTES,
    GPUSpec,
    custom_gpu,
    detect_local_gpu,
    list_gpus,
    load_gpu,
    normalize_gpu_name,
)
from memplan.errors import ConfigError, InvalidSetupError, MemplanError, UnknownGPUError
from memplan.units import GiB, MiB

REPO = Path(__file__).resolve().parents[2]
GPUS_JSON = REPO / "profiles" / "gpus.json"

REQUIRED_IDS = [
    "rtx-2080-ti", "rtx-3060-12gb", "rtx-3080-10gb", "rtx-3090", "rtx-3090-ti", "rtx-4060-ti-16gb", "rtx-4070",
    "rtx-4080", "rtx-4090", "rtx-5090", "t4", "v100-16gb", "v100-32gb", "a10g", "l4", "rtx-a4000", "rtx-a5000",
    "rtx-a6000", "rtx-6000-ada", "l40s", "a100-40gb", "a100-80gb", "h100-80gb", "h200",
    # issue 17: the cards people fine-tune on today
    "rtx-5060-ti-16gb", "rtx-5070", "rtx-5070-ti", "rtx-5080", "rtx-pro-6000-blackwell", "l40", "a40", "b200",
    "mi300x", "mi325x",
]


@pytest.fixture(autouse=True)
def _shipped_catalog(monkeypatch):
    # Tests read the checkout's catalog unless they set their own override.
    monkeypatch.delenv(catalog.PROFILES_ENV, raising=False)


def test_every_required_card_present():
    ids = [g.id for g in list_gpus()]
    assert sorted(set(REQUIRED_IDS) - set(ids)) == []
    assert len(ids) == len(set(ids))


def test_catalog_entries_are_consistent():
    raw = json.loads(GPUS_JSON.read_text())
    seen: dict[str, str] = {}
    for entry in raw["gpus"]:
        cc_major, cc_minor = map(int, entry["compute_capability"].split("."))
        assert entry["bf16"] == (cc_major >= 8), entry["id"]  # bf16 arrived with Ampere (sm_80)
        assert entry["source"].strip(), entry["id"]
        for alias in entry["aliases"]:
            assert alias == alias.lower(), f"{entry['id']}: alias {alias!r} is not lower-case"
            key = normalize_gpu_name(alias)
            assert seen.setdefault(key, entry["id"]) == entry["id"], f"alias {alias!r} used twice"
    for family, ctx in raw["context_defaults"].items():
        # Realistic PyTorch 2.x + CUDA 12 lazy-loading contexts; and say they are defaults, not measurements.
        assert 200 * MiB <= ctx["bytes"] <= 1024 * MiB, family
        assert "DEFAULT" in ctx["source"], family


@pytest.mark.parametrize(
    ("card_id", "mib"),
    [
        # Figures the brief and nvidia-smi output fix exactly.
        ("v100-16gb", 16160), ("t4", 15360), ("a100-80gb", 81920), ("h100-80gb", 81559), ("h200", 143771),
        ("rtx-4090", 24564), ("rtx-3090", 24576),
    ],
)
def test_driver_reported_totals(card_id, mib):
    assert load_gpu(card_id).total_bytes == mib * MiB


@pytest.mark.parametrize(
    ("spelling", "card_id"),
    [
        ("RTX 3090", "rtx-3090"), ("rtx-3090", "rtx-3090"), ("rtx3090", "rtx-3090"), ("3090", "rtx-3090"),
        ("rtx_3090", "rtx-3090"), ("GeForce RTX 3090", "rtx-3090"), ("NVIDIA GeForce RTX 3090", "rtx-3090"),
        ("3090 Ti", "rtx-3090-ti"), ("3090ti", "rtx-3090-ti"), ("rtx-3090-ti", "rtx-3090-ti"),
        ("4090", "rtx-4090"), ("RTX4090", "rtx-4090"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        ("3060", "rtx-3060-12gb"), ("3060-12gb", "rtx-3060-12gb"), ("rtx 3060 12GB", "rtx-3060-12gb"),
        ("3080", "rtx-3080-10gb"), ("4060ti", "rtx-4060-ti-16gb"), ("4060 Ti 16GB", "rtx-4060-ti-16gb"),
        ("4070", "rtx-4070"), ("4080", "rtx-4080"), ("5090", "rtx-5090"), ("2080ti", "rtx-2080-ti"),
        ("t4", "t4"), ("Tesla T4", "t4"), ("T4", "t4"),
        ("v100", "v100-16gb"), ("Tesla V100-SXM2-16GB", "v100-16gb"), ("v100-32gb", "v100-32gb"),
        ("Tesla V100-SXM2-32GB", "v100-32gb"),
        ("a10g", "a10g"), ("NVIDIA A10G", "a10g"), ("L4", "l4"), ("NVIDIA L4", "l4"),
        ("a4000", "rtx-a4000"), ("RTX A5000", "rtx-a5000"), ("a6000", "rtx-a6000"), ("NVIDIA RTX A6000", "rtx-a6000"),
        ("rtx6000ada", "rtx-6000-ada"), ("RTX 6000 Ada", "rtx-6000-ada"),
        ("NVIDIA RTX 6000 Ada Generation", "rtx-6000-ada"),
        ("l40s", "l40s"), ("L40S", "l40s"), ("NVIDIA L40S", "l40s"),
        ("a100", "a100-80gb"), ("a100-80g", "a100-80gb"), ("a100-80gb", "a100-80gb"), ("A100 80GB", "a100-80gb"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100 80GB PCIe", "a100-80gb"),
        ("a100-40gb", "a100-40gb"), ("A100_40G", "a100-40gb"), ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
        ("h100", "h100-80gb"), ("H100-SXM", "h100-80gb"), ("NVIDIA H100 80GB HBM3", "h100-80gb"),
        ("NVIDIA H100 PCIe", "h100-80gb"), ("h200", "h200"), ("NVIDIA H200", "h200"),
        ("5060 Ti", "rtx-5060-ti-16gb"), ("NVIDIA GeForce RTX 5060 Ti", "rtx-5060-ti-16gb"), ("5070", "rtx-5070"),
        ("RTX 5070 Ti", "rtx-5070-ti"), ("5080", "rtx-5080"), ("rtx 5080", "rtx-5080"),
        ("NVIDIA GeForce RTX 5080", "rtx-5080"), ("RTX PRO 6000", "rtx-pro-6000-blackwell"),
        ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", "rtx-pro-6000-blackwell"),
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "rtx-pro-6000-blackwell"),
        ("l40", "l40"), ("NVIDIA L40", "l40"), ("a40", "a40"), ("NVIDIA A40", "a40"),
        ("b200", "b200"), ("NVIDIA B200", "b200"), ("mi300x", "mi300x"), ("AMD Instinct MI300X", "mi300x"),
        ("MI325X", "mi325x"), ("amd instinct mi325x", "mi325x"),
    ],
)
def test_alias_variants_resolve(spelling, card_id):
    assert load_gpu(spelling).id == card_id


@pytest.mark.parametrize("card_id", ["mi300x", "mi325x"])
def test_amd_cards_say_where_bitsandbytes_applies(card_id):
    """AMD Instinct cards: bitsandbytes' ROCm build covers gfx942 on Linux x86-64 only, and memplan's CUDA-keyed
    rules (attention kernels, the context term) are flagged as unmeasured on ROCm."""
    card = load_gpu(card_id)
    assert card.family == "cdna3" and card.compute_capability == "9.4" and card.bf16
    for fact in ("gfx942", "Linux x86-64", "Windows", "aarch64", "flash_attention_2", "not been measured on ROCm",
                 "accelerator-support"):
        assert fact in card.source, fact


@pytest.mark.parametrize(
    ("bad", "expected_in_suggestion"),
    [("rtx 3095", "RTX 3090"), ("3095", "RTX 3090"), ("a100 40", "A100 40GB"), ("h10", "H100 80GB")],
)
def test_unknown_names_suggest(bad, expected_in_suggestion):
    with pytest.raises(UnknownGPUError) as info:
        load_gpu(bad)
    msg = str(info.value)
    assert msg.startswith(f"unknown GPU {bad!r} (did you mean: ")
    assert expected_in_suggestion in msg
    assert "\n" not in msg


def test_unknown_name_without_close_match_says_what_is_allowed():
    with pytest.raises(UnknownGPUError, match=r"unknown GPU 'banana'; .*24GiB"):
        load_gpu("banana")


def test_unknown_gpu_is_a_memplan_error():
    assert issubclass(UnknownGPUError, MemplanError)
    with pytest.raises(UnknownGPUError):
        load_gpu("")


@pytest.mark.parametrize(
    ("text", "total"),
    [
        ("24GiB", 24 * 2**30), ("24 GiB", 24 * 2**30), ("24gib", 24 * 2**30), ("24GB", 24 * 10**9),
        ("12000MiB", 12000 * 2**20), ("500MB", 500 * 10**6), ("22.5GiB", 22.5 * 2**30), ("24.5GB", 24_500_000_000),
    ],
)
def test_custom_budgets(text, total):
    gpu = load_gpu(text)
    assert gpu.total_bytes == total
    assert gpu.family == "unknown"
    assert gpu.cuda_context_bytes == GENERIC_CUDA_CONTEXT_BYTES
    assert load_gpu(gpu.id) == gpu  # the id round-trips (setups store gpu.id)


def test_custom_gpu_function():
    gpu = custom_gpu(24)
    assert gpu.total_bytes == 24 * GiB
    assert gpu.id == "24GiB"
    assert gpu.bf16
    assert custom_gpu(22, name="my card").name == "my card"
    assert load_gpu(custom_gpu(22.3).id).total_bytes == custom_gpu(22.3).total_bytes


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan")])
def test_custom_gpu_rejects_nonsense(bad):
    with pytest.raises(InvalidSetupError):
        custom_gpu(bad)


def test_zero_budget_string_is_rejected():
    with pytest.raises(InvalidSetupError, match="positive"):
        load_gpu("0GiB")


MINIMAL = {
    "schema_version": 1,
    "context_defaults": {"testfam": {"bytes": 100 * MiB, "source": "test"}},
    "gpus": [
        {"id": "toy", "name": "Toy Card 8GB", "aliases": ["toy8"], "total_mib": 8192, "compute_capability": "8.6",
         "bf16": True, "family": "testfam", "source": "test"}
    ],
}


def _write(tmp_path: Path, doc) -> Path:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    (tmp_path / "gpus.json").write_text(text)
    return tmp_path


def test_memplan_profiles_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPLAN_PROFILES", str(_write(tmp_path, MINIMAL)))
    assert catalog.profiles_dir() == tmp_path
    assert [g.id for g in list_gpus()] == ["toy"]
    toy = load_gpu("TOY-8")
    assert toy.total_bytes == 8 * GiB and toy.cuda_context_bytes == 100 * MiB
    with pytest.raises(UnknownGPUError):
        load_gpu("rtx-3090")


def test_profiles_dir_keyword_beats_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPLAN_PROFILES", str(tmp_path / "nowhere"))
    assert load_gpu("toy8", profiles_dir=_write(tmp_path, MINIMAL)).id == "toy"


def test_default_profiles_dir_is_the_checkout():
    assert catalog.profiles_dir() == REPO / "profiles"


def _with(**changes):
    doc = json.loads(json.dumps(MINIMAL))
    doc["gpus"][0].update(changes)
    return doc


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ('{"schema_version": 1, "gpus": [', "invalid JSON at line 1"),
        ("[]", "expected a JSON object"),
        ({**MINIMAL, "schema_version": 2}, "schema_version must be 1"),
        ({**MINIMAL, "gpus": []}, "'gpus' must be a non-empty list"),
        (_with(total_mib="8GB"), "field 'total_mib' must be a positive integer"),
        (_with(compute_capability=8.6), "field 'compute_capability'"),
        (_with(family="martian"), "family 'martian' has no entry in context_defaults"),
        ({**MINIMAL, "gpus": [{"id": "x"}]}, "missing field"),
        ({**MINIMAL, "gpus": MINIMAL["gpus"] + [dict(MINIMAL["gpus"][0], id="toy2")]}, "already used by 'toy'"),
    ],
)
def test_malformed_catalog_is_a_config_error(tmp_path, doc, problem):
    path = _write(tmp_path, doc)
    with pytest.raises(ConfigError) as info:
        list_gpus(profiles_dir=path)
    assert str(path / "gpus.json") in str(info.value)
    assert problem in str(info.value)


def test_missing_catalog_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_gpu("3090", profiles_dir=tmp_path)


def test_detect_local_gpu_none_without_nvml_library():
    # pynvml is installed in the test venv, but this machine has no NVIDIA driver / libnvidia-ml.
    assert detect_local_gpu() is None


def test_detect_local_gpu_none_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert detect_local_gpu() is None
    with pytest.raises(UnknownGPUError, match="no local NVIDIA GPU"):
        load_gpu("cuda")


class _FakeNVML:
    """Stands in for pynvml to test name/memory matching without a GPU."""

    def __init__(self, name, total, cc):
        self.name, self.total, self.cc = name, total, cc

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetName(self, h): return self.name
    def nvmlDeviceGetMemoryInfo(self, h): return type("Mem", (), {"total": self.total})()
    def nvmlDeviceGetCudaComputeCapability(self, h): return self.cc


def test_detect_matches_catalog_card(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNVML("NVIDIA H100 80GB HBM3", 81559 * MiB, (9, 0)))
    gpu = load_gpu("local")
    assert gpu.id == "h100-80gb" and gpu.total_bytes == 81559 * MiB


def test_detect_builds_adhoc_card_for_unknown_or_variant(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    # The 8 GB RTX 3060 shares its NVML name with the 12 GB catalog card: memory decides.
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNVML("NVIDIA GeForce RTX 3060", 8192 * MiB, (8, 6)))
    gpu = detect_local_gpu()
    assert gpu.id == "local" and gpu.total_bytes == 8 * GiB and gpu.family == "ampere-consumer"
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNVML("NVIDIA Future GPU", 96 * GiB, (9, 0)))
    gpu = detect_local_gpu()
    assert gpu.family == "hopper" and gpu.bf16 and gpu.cuda_context_bytes == load_gpu("h100").cuda_context_bytes


def test_planning_imports_no_torch_or_pynvml():
    code = "import sys, memplan.catalog.gpus as g; g.load_gpu('3090'); g.load_gpu('24GiB'); " \
           "print(sorted(m for m in ('torch', 'pynvml') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_gpuspec_is_frozen():
    gpu = load_gpu("t4")
    assert isinstance(gpu, GPUSpec)
    with pytest.raises(AttributeError):
        gpu.total_bytes = 1  # type: ignore[misc]
