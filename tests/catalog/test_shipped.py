"""Shipped derivations (``profiles/derived/specs``, written by ``python -m memplan.measure.derive_ship``).

- Every catalog model without a hand-written family has one, and planning it needs neither torch nor transformers:
  ``memplan fit qwen3-8b --gpu 4090`` runs in a process where both imports fail, with an empty cache.
- The shipped files stay true to the installed transformers: the spec derived again from the config equals the
  shipped one, and a shipped regime traced again gives the same terms (skipped without torch / transformers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memplan.catalog import paths
from memplan.catalog.models import derive, list_models
from memplan.measure.derive_ship import derived_catalog_ids

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "profiles"
CATALOG = list_models(profiles_dir=PROFILES) if (PROFILES / "models").is_dir() else []
DERIVED = [m for m in CATALOG if m.id in set(derived_catalog_ids(PROFILES))] if CATALOG else []
EXTRAS = pytest.mark.extras("torch", "transformers", "peft")


def _config(entry) -> dict:
    return paths.read_json(entry.path)["config"]


def test_new_architectures_are_in_the_catalog():
    if CATALOG:  # Qwen3 (dense and MoE), Qwen3.5 (dense and MoE), Gemma-3, OLMo-3, SmolLM3, Llama-4, gpt-oss
        types = {_config(m)["model_type"] for m in DERIVED}
        assert {"qwen3", "qwen3_moe", "qwen3_5_text", "qwen3_5_moe_text", "gemma3_text", "olmo3", "smollm3",
                "llama4_text", "gpt_oss"} <= types


@pytest.mark.parametrize("entry", DERIVED, ids=[m.id for m in DERIVED])
def test_every_derived_catalog_model_is_shipped(entry):
    shipped = derive.read_shipped(_config(entry))
    assert shipped is not None, f"run: python -m memplan.measure.derive_ship {entry.id}"
    assert shipped["id"] == entry.id and shipped["model_type"] == _config(entry)["model_type"]
    for regime in shipped["regimes"].values():  # a regime the libraries cannot run records why, in one line
        assert ("error" in regime and "\n" not in regime["error"]) or "check" in regime
    # most regimes extrapolate; the others are refused (memplan.plan.derived.CHECK_LIMIT)
    traced = [r for r in shipped["regimes"].values() if "check" in r]
    good = [r for r in traced if r["check"]["max_rel_error"] <= 0.01]
    assert traced and len(good) >= len(traced) // 2


def test_a_regime_that_misses_its_check_is_refused(tmp_path, monkeypatch):
    from memplan.catalog.models import load_model
    from memplan.errors import InvalidSetupError
    from memplan.plan import derived
    from memplan.plan.estimate import estimate_for
    from memplan.plan.setup import TrainSetup, resolve_setup

    if not DERIVED:
        pytest.skip("no catalog")
    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path))
    derived.clear_memo()
    spec = load_model("olmo-3-7b", profiles_dir=PROFILES)
    setup = resolve_setup(TrainSetup(model="olmo-3-7b", bits=16, rank=64, targets="all-linear", grad_ckpt=True), spec)
    miss = derive.read_shipped(spec.config)["regimes"][derived.regime_key(spec, setup)]["check"]["max_rel_error"]
    assert miss > derived.CHECK_LIMIT
    with pytest.raises(InvalidSetupError) as err:
        estimate_for(spec, setup)
    assert "miss an unfitted point" in str(err.value) and "\n" not in str(err.value)
    derived.clear_memo()


def test_shipping_covers_the_capacity_grid():
    pytest.importorskip("pandas")
    from memplan.measure.derive_ship import CARDS
    from memplan.reports.capacity import DEFAULT_GPUS

    assert set(DEFAULT_GPUS) <= set(CARDS)


@pytest.mark.parametrize("entry", DERIVED, ids=[m.id for m in DERIVED])
def test_shipped_regimes_cover_fit_on_the_report_cards(entry, tmp_path, monkeypatch):
    """Every regime memplan fit (and the capacity report) needs on its default cards and sequences is shipped:
    with tracing made impossible, the search runs through (a missing regime raises NotTracedError)."""
    import importlib

    from memplan.catalog.gpus import load_gpu
    from memplan.catalog.models import load_model
    from memplan.measure.derive_ship import CARDS, SEQ_LENS
    from memplan.plan import derived
    from memplan.plan.search import fit_for
    from memplan.plan.setup import TrainSetup

    real = importlib.import_module

    def no_trace(name, *a, **k):
        if name == "memplan.measure.derive_trace":
            raise ImportError(name="torch")
        return real(name, *a, **k)

    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(derived.importlib, "import_module", no_trace)
    derived.clear_memo()
    spec = load_model(entry.id, profiles_dir=PROFILES)
    window = spec.sliding_window
    # one card here; every card for three of them in tests/reports/test_capacity.py (all: MEMPLAN_DERIVED_ALL=1)
    for card in ("rtx-4090",) if "rtx-4090" in CARDS else CARDS[:1]:
        for seq in SEQ_LENS:
            if seq == SEQ_LENS[0] or (window and seq >= window):
                res = fit_for(spec, TrainSetup(model=entry.id, seq_len=seq), load_gpu(card),
                              pinned=frozenset({"seq_len"}))
                assert res.recommended is not None or res.leanest is not None
    derived.clear_memo()


def test_fit_on_a_shipped_model_needs_no_torch(tmp_path):
    if not DERIVED:
        pytest.skip("no catalog")
    # torch and transformers cannot be imported in this process (a None entry in sys.modules makes import fail)
    script = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; sys.modules['peft'] = None;"
              "from memplan.cli import main; sys.exit(main(['fit', 'qwen3-8b', '--gpu', '4090', '--json']))")
    env = {**os.environ, "MEMPLAN_CACHE_DIR": str(tmp_path / "empty-cache")}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert out["recommended"]["total_bytes"] > 0 and "tracing" not in run.stderr
    assert not (tmp_path / "empty-cache").exists()  # nothing traced, nothing cached


# Rederiving every shipped model builds 100B-parameter MoE models on the meta device (about a minute in all):
# opt-in, as the model-type sweep is; the suite rederives the smallest.
ALL_DERIVED = pytest.mark.skipif(not os.environ.get("MEMPLAN_DERIVED_ALL"), reason="every derived catalog model: "
                                 "MEMPLAN_DERIVED_ALL=1 runs them (about 2 minutes on 2 cores)")


@EXTRAS
@pytest.mark.parametrize("entry", [m if m.id == "qwen3-0.6b" else pytest.param(m, marks=(pytest.mark.slow, ALL_DERIVED))
                                   for m in DERIVED], ids=[m.id for m in DERIVED])
def test_shipped_spec_equals_a_fresh_derivation(entry):
    config = _config(entry)
    shipped = derive.read_shipped(config)
    if shipped is None:
        pytest.skip("not shipped")
    fields_ = derive.derive_from_transformers(config, entry.id)
    assert derive.spec_to_dict(fields_) == shipped["spec"]


@EXTRAS
def test_a_shipped_regime_traces_the_same(tmp_path, monkeypatch):
    from memplan.catalog.models import load_model
    from memplan.measure.derive_trace import trace_regime
    from memplan.plan.derived import regime_key
    from memplan.plan.setup import TrainSetup, resolve_setup

    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path))
    spec = load_model("qwen3-0.6b", profiles_dir=PROFILES)
    shipped = derive.read_shipped(spec.config)
    if shipped is None:
        pytest.skip("not shipped")
    setup = resolve_setup(TrainSetup(model="qwen3-0.6b", bits=4, method="qlora", rank=16, targets="all-linear",
                                     grad_ckpt=True), spec)
    key = regime_key(spec, setup)
    assert key in shipped["regimes"], key
    fresh = trace_regime(spec, setup, progress=False)["terms"]
    assert _flat(fresh) == pytest.approx(_flat(shipped["regimes"][key]["terms"]), rel=1e-9, abs=1e-6)


def _flat(terms: dict) -> list[float]:
    return [x for p in sorted(terms) for c in sorted(terms[p]) for k in sorted(terms[p][c]) for x in terms[p][c][k]]
