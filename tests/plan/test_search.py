"""The search: what it recommends fits, the next step up does not, pinned knobs stay pinned."""

from __future__ import annotations

from dataclasses import replace

import pytest

from memplan.plan.estimate import estimate_for
from memplan.plan.search import fit
from memplan.catalog.gpus import load_gpu
from memplan.catalog.models import load_model
from memplan.plan.setup import TrainSetup


def _fit(model="opt-13b", gpu="3090", pinned=(), **kw):
    return fit(TrainSetup(model, **kw), gpu, pinned=frozenset(pinned))


def test_opt13b_on_3090_recommends_a_plan_that_fits_and_ranks_first():
    r = _fit()
    rec = r.recommended
    assert rec is not None
    g = load_gpu("3090")
    assert r.budget_bytes == g.total_bytes - int(r.headroom * g.total_bytes)
    assert rec.total_bytes <= r.budget_bytes
    assert rec.allocatable_bytes <= r.usable_bytes
    # 16-bit OPT-13B weights alone (25.7 GB) exceed a 24 GiB card: the plan must quantize.
    assert rec.setup.bits in (8, 4)
    # The recommended plan re-estimates to the same bytes (the search does not cut corners).
    spec = load_model("opt-13b")
    assert estimate_for(spec, rec.setup, g).total_bytes == rec.total_bytes
    # The next micro-batch up does not fit.
    assert r.next_batch is not None and r.next_batch.shortfall_bytes > 0
    assert r.next_batch.estimate.setup.batch_size == 2 * rec.setup.batch_size
    # One alternative per other bit width that fits at all; 16-bit does not fit, so at least the other
    # quantized width is there.
    alt_bits = {a.setup.bits for a in r.alternatives}
    assert ({8, 4} - {rec.setup.bits}) <= alt_bits
    assert all(a.total_bytes <= r.budget_bytes for a in r.alternatives)


def test_ranking_rule_prefers_precision_then_rank_then_targets_then_batch():
    r = fit(TrainSetup("opt-1.3b"), "a100-80gb", max_batch=8)
    s = r.recommended.setup
    # A 1.3B model at batch <= 8 fits everything on 80 GB: highest precision, largest rank, all-linear,
    # the batch cap, and then no checkpointing and the exact optimizer win the ties.
    assert (s.bits, s.rank, s.targets, s.batch_size, s.grad_ckpt) == (16, 64, "all-linear", 8, False)
    assert s.optimizer == "adamw_torch"


def test_pinned_knobs_are_respected():
    r = _fit(bits=4, rank=16, optimizer="paged_adamw_8bit", grad_ckpt=True,
             pinned={"bits", "rank", "optimizer", "grad_ckpt"})
    s = r.recommended.setup
    assert (s.bits, s.rank, s.optimizer, s.grad_ckpt, s.method) == (4, 16, "paged_adamw_8bit", True, "qlora")
    assert all(a.setup.bits == 4 and a.setup.rank == 16 for a in r.alternatives)


def test_pinned_batch_size_is_evaluated_not_searched():
    r = _fit(batch_size=2, pinned={"batch_size"})
    assert r.recommended.setup.batch_size == 2 and r.next_batch is None


def test_longest_sequence_at_batch_one_is_exact():
    r = _fit(model="llama-2-7b", gpu="3060")
    spec, g = load_model("llama-2-7b"), load_gpu("3060")
    n = r.max_seq_len_batch1
    assert n is not None and n > 0
    base = replace(r.recommended.setup, batch_size=1)
    assert estimate_for(spec, replace(base, seq_len=n), g).total_bytes <= r.budget_bytes
    assert estimate_for(spec, replace(base, seq_len=n + 1), g).total_bytes > r.budget_bytes


def test_learned_positions_cap_the_sequence_search():
    r = _fit(model="opt-125m", gpu="a100-80gb")
    assert r.max_seq_len_batch1 == 2048  # OPT's max_position_embeddings


def test_nothing_fits_names_the_smallest_card():
    r = _fit(model="llama-3.1-405b", gpu="3060")
    assert r.recommended is None and r.alternatives == ()
    assert r.leanest.setup.bits == 4 and r.leanest.setup.batch_size == 1
    assert r.leanest.total_bytes > r.budget_bytes
    # 405B in 4 bits is ~200+ GiB: of the catalog's cards only the 256 GB MI325X holds it (bitsandbytes' ROCm
    # build supports 4-bit on its gfx942, profiles/gpus.json)
    assert r.smallest_gpu == "AMD Instinct MI325X"
    r70 = _fit(model="llama-3.1-70b", gpu="3060")
    assert r70.recommended is None
    assert r70.smallest_gpu is not None  # a 48 GB or 80 GB card holds 70B in 4 bits


def test_headroom_shrinks_the_budget():
    loose, tight = fit(TrainSetup("opt-6.7b"), "3090", headroom=0.0), fit(TrainSetup("opt-6.7b"), "3090", headroom=0.3)
    assert tight.budget_bytes < loose.budget_bytes
    assert tight.recommended.total_bytes <= tight.budget_bytes


def test_invalid_headroom_is_rejected():
    from memplan.errors import InvalidSetupError

    with pytest.raises(InvalidSetupError, match="headroom"):
        fit(TrainSetup("opt-1.3b"), "3090", headroom=0.9)


def test_to_dict_shape():
    d = _fit().to_dict()
    assert {"name", "total_bytes", "usable_bytes"} <= set(d["gpu"])
    assert d["recommended"]["total_bytes"] == sum(d["recommended"]["components"].values())
    assert isinstance(d["alternatives"], list) and d["alternatives"]


def test_search_skips_combinations_peft_refuses():
    # all-linear on Mixtral with the default LoRA dropout cannot run (peft ParamWrapper); the search skips
    # it instead of failing, and every plan it returns is one peft accepts.
    r = _fit(model="mixtral-8x7b", gpu="h200")
    assert r.recommended is not None
    for e in (r.recommended, *r.alternatives):
        assert e.setup.targets != "all-linear" or e.setup.lora_dropout == 0


def test_pinned_combination_that_cannot_run_is_an_error():
    from memplan.errors import InvalidSetupError

    with pytest.raises(InvalidSetupError, match="lora-dropout 0"):
        _fit(model="mixtral-8x7b", gpu="h200", targets="all-linear", bits=16, pinned={"targets", "bits"})


def test_smallest_changes_each_fit_on_their_own():
    """memplan.preflight's suggestions: single changes, each under the budget, least disruptive first; the
    micro-batch is a divisor of the old one (gradient accumulation keeps the effective batch exactly)."""
    from memplan.plan.estimate import estimate_for
    from memplan.plan.budget import Budget
    from memplan.plan.changes import smallest_changes
    from memplan.catalog.gpus import load_gpu
    from memplan.catalog.models import load_model
    from memplan.plan.setup import TrainSetup, resolve_setup

    spec, gpu = load_model("llama-2-7b-hf"), load_gpu("3090")
    setup = resolve_setup(TrainSetup("llama-2-7b-hf", batch_size=8, seq_len=512), spec, gpu)
    budget = Budget.for_gpu(gpu)
    assert not budget.fits(estimate_for(spec, setup, gpu).total_bytes)
    changes = smallest_changes(spec, setup, gpu, budget)
    assert [list(c.fields) for c in changes][:2] == [["batch_size", "grad_accum"], ["grad_ckpt"]]
    for c in changes:
        assert budget.fits(c.estimate.total_bytes)
        changed = {k for k, v in c.estimate.setup.to_dict().items() if v != getattr(setup, k)}
        assert changed <= set(c.fields) | {"method"}
    b = changes[0].fields["batch_size"]
    assert 8 % b == 0
    # the next divisor up does not fit
    assert changes[0].fields["grad_accum"] == 8 // b
    bigger = resolve_setup(setup.with_(batch_size=b * 2, grad_accum=max(1, 8 // (b * 2))), spec, gpu)
    assert not budget.fits(estimate_for(spec, bigger, gpu).total_bytes)


def test_nothing_fits_with_pinned_knobs_names_the_change_that_would():
    """16-bit pinned, 13B on a 12 GB card: nothing fits; 4-bit would (8-bit would not), and only pinned knobs
    are suggested -- the search already tried every free one."""
    from memplan.plan.search import fit
    from memplan.plan.setup import TrainSetup

    r = fit(TrainSetup("llama-2-13b-hf", bits=16), "3060", pinned=frozenset({"bits"}))
    assert r.recommended is None
    assert [c.fields.get("bits") for c in r.changes] == [4]
    assert all(c.estimate.total_bytes <= r.budget_bytes for c in r.changes)
    assert r.to_dict()["changes"][0]["fields"]["bits"] == 4
    free = fit(TrainSetup("llama-3.1-405b"), "3060")
    assert free.recommended is None and free.changes == ()  # nothing pinned: nothing left to suggest
