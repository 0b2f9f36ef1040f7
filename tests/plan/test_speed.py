"""Expected relative step time (memplan.plan.speed, docs/step-time.md) and the rankings built on it
(``fit --prefer``)."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from memplan.catalog.gpus import load_gpu
from memplan.catalog.models import load_model
from memplan.cli import main
from memplan.errors import InvalidSetupError
from memplan.plan.search import DEFAULT_PREFER, PREFERENCE_RULES, PREFERENCES, fit
from memplan.plan.setup import TrainSetup, resolve_setup
from memplan.plan.speed import INT8_FACTOR, NF4_FACTOR, step_time

DOC = Path(__file__).resolve().parents[2] / "docs" / "step-time.md"


def _resolved(**kw) -> TrainSetup:
    return resolve_setup(TrainSetup("opt-1.3b", **kw), load_model("opt-1.3b"), load_gpu("3090"))


def _seconds(text: str) -> int:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([hms])", text))


def test_int8_factor_is_the_median_of_the_talks_same_gpu_runs():
    # docs/step-time.md quotes the talk's training times; the factor is their median ratio, recomputed here
    # from the times so that a typo in either place fails.
    rows = re.findall(r"^\| \w+ \| (\d\.\d\d)x \(([\dhms ]+) / ([\dhms ]+)\)", DOC.read_text(), re.M)
    assert len(rows) == 4
    ratios = [_seconds(int8) / _seconds(fp16) for _, int8, fp16 in rows]
    for (quoted, _, _), ratio in zip(rows, ratios):
        assert float(quoted) == pytest.approx(ratio, abs=0.005)
    assert round(statistics.median(ratios), 2) == INT8_FACTOR == 1.30
    assert NF4_FACTOR == INT8_FACTOR  # assumed equal until measured (the doc says so)


def test_factors_multiply_and_name_their_parts():
    base = step_time(_resolved(method="lora", bits=16))
    assert (base.factor, base.parts) == (1.0, {})
    assert "baseline" in base.describe()
    int8 = step_time(_resolved(method="lora", bits=8, grad_ckpt=True))
    assert int8.parts == {"LLM.int8": 1.30, "checkpointing": 1.5}
    assert int8.factor == pytest.approx(1.95)
    assert int8.describe() == ("~1.95x the step time of 16-bit weights without checkpointing "
                               "(LLM.int8 1.30, checkpointing 1.50)")
    nf4 = step_time(_resolved(method="qlora", bits=4, grad_ckpt=False))
    assert nf4.parts == {"4-bit nf4": 1.30}


def test_checkpointing_costs_one_forward():
    # forward 2N, backward 4N with weight gradients (full) or 2N without (LoRA): 1 + 2/4 and 1 + 2/6.
    lora = step_time(_resolved(method="lora", bits=16, grad_ckpt=True))
    full = step_time(_resolved(method="full", bits=16, grad_ckpt=True))
    assert lora.parts == {"checkpointing": 1.5}
    assert full.parts == {"checkpointing": 1.33}


@pytest.mark.parametrize("optimizer", ["adamw_bnb_8bit", "paged_adamw_8bit", "sgd"])
def test_optimizers_do_not_change_the_step_time(optimizer):
    s = _resolved(method="lora", bits=8)
    assert step_time(replace(s, optimizer=optimizer)) == step_time(s)


def _plans(r):
    return [r.recommended, *r.alternatives]


def test_balanced_is_the_default_and_puts_qlora_before_llm_int8():
    assert DEFAULT_PREFER == "balanced" and set(PREFERENCE_RULES) == set(PREFERENCES)
    r = fit(TrainSetup("opt-13b"), "3090")
    assert r.prefer == "balanced"
    rec = r.recommended.setup
    # 16-bit does not fit; both 8- and 4-bit do: balanced takes NF4 + double quant (QLoRA).
    assert {p.setup.bits for p in _plans(r)} >= {8, 4} and 16 not in {p.setup.bits for p in _plans(r)}
    assert (rec.bits, rec.quant_type, rec.double_quant, rec.targets) == (4, "nf4", True, "all-linear")
    # Among 4-bit all-linear plans it takes the shortest step: no checkpointing when one fits without.
    assert not rec.grad_ckpt and step_time(rec).factor == 1.30


def test_quality_keeps_the_precision_first_rule():
    r = fit(TrainSetup("opt-13b"), "3090", prefer="quality")
    assert r.recommended.setup.bits == 8
    assert all(p.setup.bits <= 8 for p in r.alternatives)


def test_speed_takes_the_shortest_expected_step():
    r = fit(TrainSetup("opt-13b"), "3090", prefer="speed")
    fastest = min(step_time(p.setup).factor for p in _plans(r))
    assert step_time(r.recommended.setup).factor == fastest


def test_memory_takes_the_leanest_plan_at_batch_one():
    r = fit(TrainSetup("llama-2-7b"), "3060", prefer="memory")
    assert r.recommended.setup.batch_size == 1
    assert r.recommended.total_bytes == r.leanest.total_bytes
    assert all(r.recommended.total_bytes <= p.total_bytes for p in r.alternatives)
    # the next batch fits, and the output says why the search stopped at 1
    assert r.next_batch is not None and r.next_batch.fits


def test_an_unknown_preference_is_one_line(capsys):
    with pytest.raises(InvalidSetupError, match="invalid preference 'fast'; allowed: balanced, quality, speed, mem"):
        fit(TrainSetup("opt-13b"), "3090", prefer="fast")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "opt-13b", "--gpu", "3090", "--prefer", "fast"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'fast'" in err[0]


def test_fit_output_gives_each_plan_its_step_time(capsys):
    assert main(["fit", "opt-13b", "--gpu", "3090", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["prefer"] == "balanced"
    assert d["recommended"]["relative_step_time"] == 1.30
    assert all(a["relative_step_time"] >= 1.0 for a in d["alternatives"])
    assert main(["fit", "llama-2-7b", "--gpu", "3060", "--prefer", "memory"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Recommended (memory):" in out and "--prefer memory keeps the smallest batch" in out
    assert re.search(r"~1\.95x the step time of 16-bit weights without checkpointing", out)
