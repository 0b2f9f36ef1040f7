"""fit and the savers (memplan.plan.savers): the plan that needs one, what each buys, and the initialisation phase."""

from __future__ import annotations

import pytest

from memplan.errors import InvalidSetupError
from memplan.plan.search import fit
from memplan.plan.setup import TrainSetup

PINNED = frozenset({"batch_size", "seq_len", "method"})


def test_fit_names_the_saver_a_plan_needs():
    setup = TrainSetup("llama-3.1-8b", method="qlora", batch_size=4, seq_len=2048)
    r = fit(setup, "3090", pinned=PINNED)
    assert r.recommended is not None and r.saver_needed is not None
    assert "liger" in r.saver_needed.lower()
    assert r.recommended.setup.loss == "liger"
    # pinned off, nothing fits: the saver was what made the difference
    off = fit(setup.with_(loss="default", activation_offload="off"), "3090",
              pinned=PINNED | {"loss", "activation_offload"})
    assert off.recommended is None and off.saver_needed is None


def test_fit_says_what_each_free_saver_buys():
    r = fit(TrainSetup("llama-3.1-8b", seq_len=2048), "4090", pinned=frozenset({"seq_len"}))
    by = {(o.field, o.value): o for o in r.savers}
    assert ("loss", "liger") in by and ("activation_offload", "pinned") in by
    for o in r.savers:
        assert o.saved_bytes > 0 and o.same_batch.total_bytes == r.recommended.total_bytes - o.saved_bytes
        if o.largest is not None:
            assert o.largest.setup.batch_size >= r.recommended.setup.batch_size
    assert by[("activation_offload", "pinned")].host_bytes > 0  # the host RAM it needs
    d = r.to_dict()
    assert {s["value"] for s in d["savers"]} >= {"liger", "pinned"}


def test_pinned_savers_are_not_searched():
    r = fit(TrainSetup("llama-3.1-8b", seq_len=2048, loss="default"), "4090", pinned=frozenset({"seq_len", "loss"}))
    assert all(o.field != "loss" for o in r.savers)


def test_fit_reports_the_initialisation_phase_and_the_path_within_the_card():
    r = fit(TrainSetup("llama-2-7b-hf", method="qlora", init="loftq"), "3060", pinned=frozenset({"method", "init"}))
    assert r.init is not None
    ids = [p.path_id for p in r.init.paths]
    assert set(ids) == {"kbit_model", "full_precision"}
    assert r.init.within is not None and r.init.within.path_id == "kbit_model"  # the 4-bit path fits 12 GB
    assert r.init.binding in ("training", "initialisation")
    assert r.to_dict()["init"]["path_within"] == "kbit_model"
    # on a card too small for the full-precision path but not for training... the binding phase is the init
    plain = fit(TrainSetup("llama-2-7b-hf", method="qlora"), "3060", pinned=frozenset({"method"}))
    assert plain.init is None


def test_derived_models_refuse_features_they_were_not_traced_for():
    with pytest.raises(InvalidSetupError, match="derived architecture"):
        fit(TrainSetup("qwen3-8b", adapter="dora"), "4090", pinned=frozenset({"adapter"}))
    r = fit(TrainSetup("qwen3-8b"), "4090")  # savers left free are skipped, not errors
    assert r.recommended is not None and r.savers == ()
