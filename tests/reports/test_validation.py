"""The validation report: its headline numbers and files (memplan.reports.validation)."""

from __future__ import annotations

import csv

import pytest

from memplan.measure.validate import MatrixRow, RunRow
from memplan.plan.breakdown import COMPONENTS
from memplan.reports.validation import write_report


def matrix_row(model, arch, analytic, simulated, error=None):
    comps = dict.fromkeys(COMPONENTS, 0)
    setup = dict(model=model, method="lora", bits=16, quant_type="nf4", double_quant=True, dtype="bf16", rank=8,
                 targets="q_proj,v_proj", lora_dropout=0.05, optimizer="adamw_torch", batch_size=1, seq_len=512,
                 grad_ckpt=False, attn="sdpa")
    return MatrixRow(setup, arch, analytic, simulated, {**comps, "weights": analytic}, {**comps, "weights": simulated},
                     "backward_start", "backward_start", 1.0, error)


@pytest.mark.extras("matplotlib")
def test_report_headline_numbers_and_files(tmp_path):
    rows = [matrix_row("a", "opt", 101, 100), matrix_row("b", "opt", 97, 100), matrix_row("c", "llama", 110, 100),
            matrix_row("d", "llama", 100, 0, error="RuntimeError: boom")]
    runs = [RunRow("x.json", rows[0].setup, "cpu", "ok", 200, "tensor peak (CPU)", 210, 200)]
    paths = write_report(tmp_path, matrix=rows, runs=runs, command="memplan validate --matrix")
    names = {p.name for p in paths}
    assert {"validation.md", "validation_matrix.csv", "validation_runs.csv", "validation.png"} <= names
    md = (tmp_path / "validation.md").read_text()
    # errors 1%, 3%, 10% -> median 3.00%, worst 10.00%; 1 within 2%, 2 within 5%
    assert "setups: **3** over **2 architectures**" in md
    assert "median |error|: **3.00%**, worst: **10.00%**" in md
    assert "within 2%: 1/3; within 5%: 2/3" in md
    assert "simulations that failed: 1" in md and "RuntimeError: boom" in md
    assert "analytic median |error| **5.00%**" in md  # the run: 210 / 200
    assert "`memplan validate --matrix`" in md
    with open(tmp_path / "validation_matrix.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and table[0]["ratio"] == "1.01000"
    assert (tmp_path / "validation.png").stat().st_size > 10_000


def test_report_without_runs_says_how_to_add_them(tmp_path):
    write_report(tmp_path, matrix=[], runs=[])
    assert "memplan profile" in (tmp_path / "validation.md").read_text()
