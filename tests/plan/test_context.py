"""Context limits (issue 17): a plan stays within the model's trained context unless the user opts in."""

from __future__ import annotations

import pytest

from memplan.catalog.models import load_model
from memplan.cli import main
from memplan.errors import InvalidSetupError
from memplan.plan.estimate import estimate
from memplan.plan.search import fit
from memplan.plan.setup import TrainSetup, sequence_limit


def test_the_trained_context_is_the_limit_unless_allowed():
    spec = load_model("llama-2-7b-hf")
    assert sequence_limit(spec) == 4096 == spec.max_position_embeddings
    assert sequence_limit(spec, allow_long_context=True) is None
    with pytest.raises(InvalidSetupError, match=r"8,192 exceeds llama-2-7b-hf's trained context of 4,096 tokens"):
        estimate(TrainSetup("llama-2-7b-hf", seq_len=8192))
    long = estimate(TrainSetup("llama-2-7b-hf", seq_len=8192, allow_long_context=True))
    assert long.total_bytes > estimate(TrainSetup("llama-2-7b-hf", seq_len=4096)).total_bytes


def test_learned_positions_stay_a_hard_limit():
    for allow in (False, True):
        with pytest.raises(InvalidSetupError, match="learned position embeddings"):
            estimate(TrainSetup("opt-1.3b", seq_len=4096, allow_long_context=allow))


def test_a_rope_scaled_config_is_planned_to_its_scaled_context():
    assert sequence_limit(load_model("llama-3.1-8b")) == 131072  # rope_type llama3, factor 8: the config says so


def test_fit_stops_the_longest_sequence_at_the_trained_context():
    r = fit(TrainSetup("llama-2-7b-hf"), "h200")
    assert r.max_seq_len_batch1 == 4096 and r.max_seq_len_is_model_limit
    longer = fit(TrainSetup("llama-2-7b-hf", allow_long_context=True), "h200")
    assert longer.max_seq_len_batch1 > 4096 and not longer.max_seq_len_is_model_limit


def test_the_cli_says_how_to_opt_in(capsys):
    assert main(["estimate", "llama-2-7b", "--seq-len", "8192"]) == 2
    err = capsys.readouterr().err
    assert "--allow-long-context" in err and len(err.strip().splitlines()) == 1
    assert main(["estimate", "llama-2-7b", "--seq-len", "8192", "--allow-long-context", "--json"]) == 0
