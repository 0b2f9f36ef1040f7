"""Precision regimes: fit keeps the one it is given and says when another one of the same script fits a larger
batch (memplan.plan.regimes)."""

from __future__ import annotations

import json

from memplan.cli import main
from memplan.plan.search import fit
from memplan.plan.setup import TrainSetup


def test_fp32_master_weights_are_told_that_bf16_weights_fit_a_larger_batch():
    r = fit(TrainSetup("llama-3.2-1b", bits=32), "3090", pinned=frozenset({"bits"}))
    rec = r.recommended
    assert (rec.setup.bits, rec.setup.autocast) == (32, "bf16")  # the regime as given: the Trainer's AMP
    (bf16,) = [x for x in r.regimes if "instead of fp32 master weights" in x.change]
    assert (bf16.estimate.setup.bits, bf16.estimate.setup.autocast) == (16, "bf16")
    assert bf16.estimate.setup.batch_size > rec.setup.batch_size
    assert r.budget.fits(bf16.estimate.total_bytes)


def test_no_regime_note_when_the_batch_is_pinned_or_nothing_leaner_fits_more(capsys):
    pinned = fit(TrainSetup("llama-3.2-1b", bits=32, batch_size=1), "3090", pinned=frozenset({"bits", "batch_size"}))
    assert pinned.regimes == ()
    assert main(["fit", "llama-3.2-1b", "--gpu", "3090", "--bits", "32", "--json"]) in (0, 1)
    d = json.loads(capsys.readouterr().out)
    assert d["regimes"] and d["regimes"][0]["estimate"]["setup"]["bits"] == 16
    assert main(["fit", "llama-3.2-1b", "--gpu", "3090", "--bits", "32"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Another precision regime of the same script: load the weights in bf16" in out
