"""memplan.plan.budget: one formula for what a plan may use of a card (total - context - headroom)."""

from __future__ import annotations

import pytest

from memplan.catalog.gpus import load_gpu
from memplan.errors import InvalidSetupError
from memplan.plan.budget import DEFAULT_HEADROOM, Budget, check_headroom
from memplan.units import MiB


def test_budget_arithmetic_for_a_card():
    gpu = load_gpu("rtx-3090")
    budget = Budget.for_gpu(gpu)
    # total   = 24576 MiB                               = 25_769_803_776 B
    # context = ampere-consumer default 450 MiB         =    471_859_200 B
    # headroom= int(0.05 * 25_769_803_776)              =  1_288_490_188 B  (1288490188.8, truncated)
    # usable  = 25_769_803_776 - 471_859_200 - 1_288_490_188 = 24_009_454_388 B
    assert budget.total_bytes == 25_769_803_776
    assert budget.context_bytes == gpu.cuda_context_bytes == 450 * MiB
    assert budget.headroom_bytes == 1_288_490_188
    assert budget.usable_bytes == 24_009_454_388
    assert budget.limit_bytes == 25_769_803_776 - 1_288_490_188
    assert DEFAULT_HEADROOM == 0.05
    # headroom 0: only the context is held back; 0.5: half the card as well.
    assert Budget.for_gpu(gpu, 0).usable_bytes == 25_769_803_776 - 471_859_200
    assert Budget.for_gpu(gpu, 0.5).usable_bytes == 25_769_803_776 - 471_859_200 - 12_884_901_888


def test_fits_and_shortfall_are_against_the_limit():
    budget = Budget.of_limit(1000, context_bytes=100)
    assert budget.limit_bytes == 1000 and budget.usable_bytes == 900
    assert budget.fits(1000) and not budget.fits(1001)
    assert budget.shortfall(1200) == 200 and budget.shortfall(900) == -100


@pytest.mark.parametrize("headroom", [-0.01, 0.51, 5, float("nan"), True, "0.1"])
def test_headroom_out_of_range_is_rejected(headroom):
    with pytest.raises(InvalidSetupError, match=r"headroom .* allowed: 0 to 0\.5"):
        check_headroom(headroom)
    with pytest.raises(InvalidSetupError):
        Budget.for_gpu(load_gpu("t4"), headroom)


def test_no_headroom_given_is_the_default():
    assert check_headroom(None) == DEFAULT_HEADROOM
