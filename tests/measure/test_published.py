"""memplan against published measurements (issue 14): the data, its mapping, the comparison in each row's
metric, the claims, the committed report. Pure: none of this needs torch."""

from __future__ import annotations

import csv
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from memplan.cli import main
from memplan.measure.published import (
    MAPPING_COLUMNS,
    STATUSES,
    PublishedRow,
    load_published,
    score_published,
)
from memplan.plan.estimate import estimate
from memplan.plan.setup import TrainSetup
from memplan.reports.published import PUBLISHED_COLUMNS, summarize, write_published_report

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "profiles" / "published" / "measurements.csv"
MAPPING = ROOT / "profiles" / "published" / "mapping.csv"
GIB = 2**30

SOURCE_COLUMNS = ("id", "source", "source_ref", "source_date", "model", "params_b", "method", "weight_dtype", "quant",
                  "double_quant", "lora_r", "lora_alpha", "lora_targets", "trainable_params", "optimizer",
                  "micro_batch_size", "seq_len", "grad_ckpt", "grad_accum", "attn_impl", "framework", "parallelism",
                  "gpu", "measured_value", "unit", "value_gib", "metric", "metric_code", "outcome",
                  "measured_or_estimate", "reliability", "notes")


@pytest.fixture(scope="module")
def results():
    return score_published(load_published(DATA))


def test_the_data_keeps_every_source_column_and_every_row():
    with open(DATA, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == SOURCE_COLUMNS
    assert len(rows) == 150
    assert all(r["source"] and r["source_ref"] for r in rows)


def test_every_row_is_mapped_or_skipped_with_a_reason():
    with open(MAPPING, newline="", encoding="utf-8") as f:
        maps = list(csv.DictReader(f))
    assert tuple(maps[0]) == MAPPING_COLUMNS
    for m in maps:
        assert bool(m["skip"]) != bool(m["model"]), m["id"]  # a setup or a reason, never both, never neither
        if not m["skip"]:
            assert m["compare_as"] in ("alloc", "reserved", "nvml", "fit"), m["id"]
            assert m["framework"] in ("hf", "litgpt", "torchtune"), m["id"]


def test_every_mapped_row_is_planned(results):
    """A mapping row memplan cannot plan is a bug in the mapping, not a skip: only the data's own gaps skip."""
    unplanned = [(r.row.id, r.reason) for r in results if r.status == "skipped" and not r.row.skip_reason]
    assert not unplanned


def test_statuses_are_the_issues_words(results):
    assert {r.status for r in results} <= set(STATUSES)
    for r in results:
        if r.status == "skipped":
            assert r.status_text.startswith("skipped:") and len(r.status_text) > len("skipped:")


def test_every_oom_and_fits_claim_is_answered_right(results):
    claims = [r for r in results if r.status in ("oom_ok", "oom_missed", "fits_ok", "fits_missed")]
    assert len(claims) >= 10
    assert [(r.row.id, r.status) for r in claims if r.status.endswith("_missed")] == []


def _row(metric: str, measured: float | None = 10.0, outcome: str = "value", **mapping) -> PublishedRow:
    m = dict.fromkeys(MAPPING_COLUMNS, "")
    m.update(id="T1", framework="hf", model="llama-2-7b-hf", method="lora", bits="16", dtype="bf16", rank="8",
             targets="q_proj,v_proj", optimizer="adamw_torch", batch_size="2", seq_len="512", grad_ckpt="False",
             attn="sdpa", autocast="off", gpu="a100-80gb", compare_as=metric)
    m.update(mapping)
    return PublishedRow(id="T1", source="test", framework="hf", source_framework="test", reliability="A",
                        metric_code=metric, outcome=outcome, measured_gib=measured, gpu_text="", mapping=m)


@pytest.mark.parametrize("metric", ["alloc", "reserved", "nvml"])
def test_each_metric_compares_what_it_measures(metric):
    est = estimate(TrainSetup(model="llama-2-7b-hf", method="lora", bits=16, dtype="bf16", rank=8,
                              targets="q_proj,v_proj", batch_size=2, seq_len=512, grad_ckpt=False, attn="sdpa",
                              autocast="off", gpu="a100-80gb"))
    c = est.components
    expected = {"alloc": est.total_bytes - c["cuda_context"] - c["allocator_overhead"],
                "reserved": est.total_bytes - c["cuda_context"],
                "nvml": est.total_bytes}[metric]
    (res,) = score_published([_row(metric)])
    assert res.status == "compared"
    assert res.predicted_gib == pytest.approx(expected / GIB, rel=1e-12)
    assert res.error == pytest.approx(expected / GIB / 10.0 - 1, rel=1e-12)


def test_paged_optimizer_state_is_not_in_torchs_allocator():
    """bitsandbytes' paged state is cudaMallocManaged: max_memory_allocated never sees it, nvidia-smi does."""
    kw = dict(method="full", bits="16", rank="", targets="", optimizer="paged_adamw_32bit", model="llama-3.2-1b")
    full = estimate(TrainSetup(model="llama-3.2-1b", method="full", bits=16, dtype="bf16", batch_size=2, seq_len=512,
                               grad_ckpt=False, attn="sdpa", autocast="off", optimizer="paged_adamw_32bit",
                               gpu="a100-80gb"))
    assert full.paged_bytes > GIB
    (alloc,) = score_published([_row("alloc", **kw)])
    (nvml,) = score_published([_row("nvml", **kw)])
    c = full.components
    assert alloc.predicted_gib * GIB == pytest.approx(
        full.total_bytes - c["cuda_context"] - c["allocator_overhead"] - full.paged_bytes)
    assert nvml.predicted_gib * GIB == pytest.approx(full.total_bytes)


def test_claims_compare_with_the_card():
    big = dict(model="llama-2-13b-hf", batch_size="8", seq_len="2048", gpu="a10g")
    (oom,) = score_published([_row("fit", None, "OOM on 24GB", **big)])
    (fits,) = score_published([_row("fit", None, "fits in 24GB", **big)])
    assert oom.status == "oom_ok" and fits.status == "fits_missed"
    assert oom.capacity_gib == pytest.approx(23028 / 1024)  # the A10G's 23,028 MiB, not "24 GB"
    small = dict(model="llama-3.2-1b", batch_size="1", seq_len="256", gpu="a10g")
    (oom,) = score_published([_row("fit", None, "OOM on 24GB", **small)])
    (fits,) = score_published([_row("fit", None, "fits in 24GB", **small)])
    assert oom.status == "oom_missed" and fits.status == "fits_ok"


def test_a_row_memplan_cannot_plan_is_skipped_with_memplans_reason():
    (res,) = score_published([_row("alloc", model="gemma-2-2b", attn="sdpa")])
    assert res.status == "skipped" and "sdpa" in res.reason
    (res,) = score_published([replace(_row("alloc"), mapping={**_row("alloc").mapping, "skip": "several GPUs"})])
    assert res.status_text == "skipped:several GPUs"


def test_report_files_and_columns(tmp_path, results):
    paths = write_published_report(tmp_path, results)
    assert {p.name for p in paths} == {"published.csv", "published.md", "published.png"}
    with open(tmp_path / "published.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == PUBLISHED_COLUMNS
    assert len(rows) == 150
    md = (tmp_path / "published.md").read_text()
    for heading in ("## Per source and framework", "## Compared rows", "## Claims", "## Skipped rows"):
        assert heading in md
    s = summarize(results)
    assert s["ab"]["n"] >= 60


def test_the_committed_report_is_current(results, tmp_path):
    """reports/published.csv is what the code computes now: rerun
    `memplan validate --published profiles/published/measurements.csv --out reports --force` after a change."""
    write_published_report(tmp_path, results)
    assert (tmp_path / "published.csv").read_text() == (ROOT / "reports" / "published.csv").read_text()


def test_cli_writes_the_report_and_refuses_bad_input(tmp_path, capsys):
    assert main(["validate", "--published", str(DATA), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "published.md").exists()
    out = capsys.readouterr().out
    assert "A/B rows" in out
    assert main(["validate", "--published", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "s")]) != 0
    err = capsys.readouterr().err
    assert "nope.csv" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_scoring_needs_no_torch():
    code = ("import sys; from memplan.measure.published import load_published, score_published; "
            f"score_published(load_published({str(DATA)!r})); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
