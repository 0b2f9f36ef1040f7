"""Capacity reports: the numbers are `memplan fit`'s, the files are complete and self-contained, the CLI
rejects bad input with one line, and importing the module stays light."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from memplan.catalog.gpus import load_gpu
from memplan.catalog.models import load_model
from memplan.cli import main
from memplan.errors import InvalidSetupError
from memplan.plan.search import fit, fit_for
from memplan.plan.setup import TrainSetup
from memplan.reports.capacity import CSV_COLUMNS, ReportDependencyError, capacity_frame, capacity_rows
from memplan.reports.capacity_docs import write_capacity_report

MODELS = ["llama-3.2-1b", "llama-3.1-8b", "opt-1.3b"]
GPUS = ["3060", "4090"]
SEQS = [512, 2048]


@pytest.fixture(scope="module")
def rows():
    return capacity_rows(MODELS, GPUS, SEQS)


def _fit(model: str, gpu: str, seq: int):
    # What `memplan fit MODEL --gpu GPU --seq-len SEQ --loss default --activation-offload off` computes (the flags
    # pin them: the capacity grid plans plain steps, memplan.reports.capacity.PLAIN_STEP).
    return fit(TrainSetup(model, seq_len=seq, loss="default", activation_offload="off"), gpu,
               pinned=frozenset({"seq_len", "loss", "activation_offload"}))


def test_rows_are_fits_results(rows):
    assert len(rows) == len(MODELS) * len(GPUS) * len(SEQS)
    assert [(r.seq_len, r.model) for r in rows][:2] == [(512, "llama-3.2-1b")] * 2  # sequence, model, card order
    checked = 0
    for r in rows:
        res = _fit(r.model, r.gpu_id, r.seq_len)
        assert r.budget_bytes == res.budget_bytes and r.usable_bytes == res.usable_bytes
        if res.recommended is None:
            assert r.status == "no-fit" and r.peak_bytes is None
            assert r.leanest_peak_bytes == res.leanest.total_bytes
            continue
        s = res.recommended.setup
        assert r.status == "fits"
        assert (r.bits, r.rank, r.targets, r.batch_size, r.grad_ckpt, r.optimizer) == (
            s.bits, s.rank, s.targets, s.batch_size, s.grad_ckpt, s.optimizer)
        assert r.peak_bytes == res.recommended.total_bytes
        assert r.headroom_left_bytes == res.budget_bytes - res.recommended.total_bytes >= 0
        assert r.components == res.recommended.components and sum(r.components.values()) == r.peak_bytes
        assert r.max_seq_len_batch1 == res.max_seq_len_batch1
        checked += 1
    assert checked >= 8


def test_grid_has_the_expected_shape(rows):
    by = {(r.model, r.gpu_id, r.seq_len): r for r in rows}
    # A 1B model trains at 16 bits on a 12 GB card; an 8B model needs 4 bits there at 512 tokens.
    assert by["llama-3.2-1b", "rtx-3060-12gb", 512].bits == 16
    assert by["llama-3.1-8b", "rtx-3060-12gb", 512].bits == 4
    # On a 24 GB card the 8B model trains in 16 bits without checkpointing at 512 tokens (the fastest plan
    # --prefer balanced finds) and needs checkpointing at 2048.
    short, long = by["llama-3.1-8b", "rtx-4090", 512], by["llama-3.1-8b", "rtx-4090", 2048]
    assert (short.bits, short.grad_ckpt, long.bits, long.grad_ckpt) == (16, False, 16, True)
    assert {r.prefer for r in rows} == {"balanced"}


def test_prefer_memory_gives_the_leanest_plan_at_batch_one():
    lean, = capacity_rows(["llama-3.1-8b"], ["4090"], [512], prefer="memory")
    assert lean.prefer == "memory" and lean.batch_size == 1
    res = fit_for(load_model("llama-3.1-8b"), TrainSetup("llama-3.1-8b", seq_len=512), load_gpu("4090"),
                  pinned=frozenset({"seq_len"}), prefer="memory")
    assert lean.peak_bytes == res.leanest.total_bytes == res.recommended.total_bytes
    with pytest.raises(InvalidSetupError, match="invalid preference 'fast'; allowed: balanced, quality"):
        capacity_rows(["llama-3.1-8b"], ["4090"], [512], prefer="fast")


def test_nothing_fits_names_the_smallest_card_or_none():
    rows = capacity_rows(["llama-3.1-70b", "llama-3.1-405b"], ["4090"], [512])
    big, huge = rows
    res = _fit("llama-3.1-70b", "4090", 512)
    assert big.status == "no-fit" and res.recommended is None
    assert big.smallest_gpu == load_gpu(res.smallest_gpu).label  # e.g. "RTX A6000"
    assert big.leanest_peak_bytes == res.leanest.total_bytes > big.budget_bytes
    # 405B in 4 bits fits only the 256 GB MI325X of the catalog's cards
    assert huge.status == "no-fit" and huge.smallest_gpu == "AMD Instinct MI325X"
    from dataclasses import replace

    from memplan.reports.capacity_docs import _cell

    assert _cell(big) == f"— (needs {big.smallest_gpu})"
    assert _cell(replace(huge, smallest_gpu=None)) == "— (fits no catalog card)"


def test_sequence_beyond_the_models_positions_is_na_not_an_error():
    rows = capacity_rows(["opt-1.3b", "llama-2-7b-hf"], ["a100-80g"], [4096, 8192])
    status = {(r.model, r.seq_len): r for r in rows}
    assert status["opt-1.3b", 4096].status == "n/a" and "2,048" in status["opt-1.3b", 4096].reason
    assert status["llama-2-7b-hf", 4096].status == "fits"
    # One rule for the sequence limit (memplan.plan.setup.sequence_limit): beyond a rotary model's trained context
    # (llama-2: 4,096) the cell is n/a, as `memplan fit --seq-len 8192` refuses it without --allow-long-context.
    assert status["llama-2-7b-hf", 8192].status == "n/a" and "4,096" in status["llama-2-7b-hf", 8192].reason


def test_library_rejects_bad_input():
    from memplan.errors import InvalidSetupError, UnknownGPUError, UnknownModelError

    with pytest.raises(UnknownModelError, match="did you mean"):
        capacity_rows(["llama-3.1-9b"], ["4090"], [512])
    with pytest.raises(UnknownGPUError):
        capacity_rows(["opt-1.3b"], ["rtx 3095"], [512])
    with pytest.raises(InvalidSetupError, match="sequence length"):
        capacity_rows(["opt-1.3b"], ["4090"], [0])
    with pytest.raises(InvalidSetupError, match="headroom"):
        capacity_rows(["opt-1.3b"], ["4090"], [512], headroom=5)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    rows = capacity_rows(["llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b", "opt-1.3b"], ["4090", "a100"],
                         [512, 4096])
    out = tmp_path_factory.mktemp("capacity")
    paths = write_capacity_report(rows, out, ("md", "html"), command="memplan report capacity --test")
    return rows, out, paths


@pytest.mark.extras("pandas", "matplotlib")
def test_report_files(report):
    rows, out, paths = report
    names = {p.name for p in paths}
    assert {"capacity.md", "capacity.html", "capacity.csv", "capacity_curves.png",
            "capacity_heatmap_seq512.png", "capacity_heatmap_seq4096.png", "capacity_breakdown_seq512.png"} <= names
    assert all(p.parent == out and p.exists() for p in paths)
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


@pytest.mark.extras("pandas", "matplotlib")
def test_pngs_are_real_pictures(report):
    import matplotlib.image as mpimg

    _, out, paths = report
    pngs = [p for p in paths if p.suffix == ".png"]
    assert len(pngs) == 5
    for p in pngs:
        assert p.stat().st_size > 10_000, p
        height, width = mpimg.imread(p).shape[:2]
        assert width > 500 and height > 300, (p, width, height)


@pytest.mark.extras("pandas", "matplotlib")
def test_markdown_report(report):
    rows, out, _ = report
    md = (out / "capacity.md").read_text(encoding="utf-8")
    import memplan

    assert "memplan report capacity --test" in md and f"memplan {memplan.__version__}" in md
    assert "## Sequence length 512" in md and "## Sequence length 4,096" in md and "## How to read" in md
    for name in ("capacity_heatmap_seq512.png", "capacity_breakdown_seq4096.png", "capacity_curves.png"):
        assert f"]({name})" in md
    # A compact cell per (model, card) and the plan details with peak and headroom in GiB.
    ok = next(r for r in rows if r.status == "fits" and r.model == "llama-3.1-8b" and r.seq_len == 512)
    assert f"{ok.bits}b r{ok.rank} all-linear ×{ok.batch_size}" in md
    assert f"| {ok.peak_bytes / 2**30:.2f} | {ok.headroom_left_bytes / 2**30:.2f} |" in md
    assert "— (needs " in md  # llama-3.1-70b on the 4090
    assert "n/a: " in md  # opt-1.3b at 4,096 tokens


@pytest.mark.extras("pandas", "matplotlib")
def test_html_is_self_contained(report):
    _, out, _ = report
    html = (out / "capacity.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html
    for banned in ("http://", "https://", 'src="//', "<link", "<script", "@import", "url("):
        assert banned not in html, banned
    srcs = re.findall(r'<img[^>]*src="([^"]*)"', html)
    assert len(srcs) == 5 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "memplan report capacity --test" in html and 'id="how-to-read"' in html
    assert html.count("<table>") == 4  # matrix + details per sequence length


@pytest.mark.extras("pandas", "matplotlib")
def test_csv_and_dataframe(report):
    rows, out, _ = report
    with open(out / "capacity.csv", newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))
    assert tuple(records[0]) == CSV_COLUMNS
    assert len(records) == len(rows) == 16
    assert {"model", "gpu", "seq_len", "status", "bits", "batch_size", "peak_bytes", "headroom_left_bytes",
            "smallest_gpu", "weights_bytes", "activations_bytes"} <= set(CSV_COLUMNS)
    first = next(r for r in rows if r.status == "fits")
    rec = next(x for x in records if (x["model"], x["gpu_id"], int(x["seq_len"])) == (first.model, first.gpu_id,
                                                                                       first.seq_len))
    assert int(rec["peak_bytes"]) == first.peak_bytes

    df = capacity_frame(["llama-3.2-1b", "llama-3.1-70b"], ["4090"], [512, 2048])
    assert df.shape == (4, len(CSV_COLUMNS)) and list(df.columns) == list(CSV_COLUMNS)
    assert set(df["status"]) == {"fits", "no-fit"}
    assert str(df["peak_bytes"].dtype) == "Int64" and str(df["bits"].dtype) == "Int64"  # exact, not NaN floats
    expected = capacity_rows(["llama-3.2-1b"], ["4090"], [512])[0]
    assert df.loc[0, "peak_bytes"] == expected.peak_bytes and df.loc[0, "batch_size"] == expected.batch_size
    assert df.loc[df["status"] == "no-fit", "peak_bytes"].isna().all()


def test_unknown_format_is_refused(rows, tmp_path):
    from memplan.errors import InvalidSetupError

    with pytest.raises(InvalidSetupError, match="allowed: md, html"):
        write_capacity_report(rows, tmp_path, ("pdf",))


def _cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, needle", [
    (["--models", "llama-3.1-9b"], "unknown model 'llama-3.1-9b'"),
    (["--gpus", "rtx 3095"], "unknown GPU 'rtx 3095'"),
    (["--seq-len", "abc"], "invalid sequence length 'abc'"),
    (["--seq-len", "512,0"], "invalid sequence length 0"),
    (["--format", "md,pdf"], "unknown format 'pdf'"),
    (["--headroom", "0.9"], "headroom 0.9 is out of range"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, tmp_path, argv, needle):
    code, out, err = _cli(capsys, "report", "capacity", "--out", str(tmp_path), *argv)
    assert code == 2
    assert err.count("\n") == 1 and needle in err and err.startswith("memplan "), err
    assert not list(tmp_path.iterdir())


def test_cli_report_alone_prints_help_exit_2(capsys):
    code, out, err = _cli(capsys, "report")
    assert code == 2 and "capacity" in err and out == ""  # the help is not a result: stderr


@pytest.mark.extras("pandas", "matplotlib")
def test_cli_writes_the_report(capsys, tmp_path):
    code, out, err = _cli(capsys, "report", "capacity", "--models", "llama-3.2-1b,opt-1.3b", "--gpus", "4090",
                          "--seq-len", "512", "--format", "md,html", "--out", str(tmp_path))
    assert code == 0, err
    assert f"wrote {tmp_path / 'capacity.md'}" in out and f"wrote {tmp_path / 'capacity.html'}" in out
    md = (tmp_path / "capacity.md").read_text(encoding="utf-8")
    assert ("memplan report capacity --models llama-3.2-1b,opt-1.3b --gpus 4090 --seq-len 512 --format md,html "
            f"--out {tmp_path}") in md


def test_missing_matplotlib_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ModuleNotFoundError
    code, _, err = _cli(capsys, "report", "capacity", "--models", "opt-1.3b", "--gpus", "4090", "--out",
                        str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "pip install 'memplan[report]'" in err


def test_missing_pandas_raises_a_memplan_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ReportDependencyError, match=r"memplan\[report\]"):
        capacity_frame(["opt-1.3b"], ["4090"], [512])


LIGHT = """
import json, sys
import memplan.reports.capacity as r
from memplan.cli import build_parser
build_parser()
rows = r.capacity_rows(["opt-1.3b"], ["4090"], [512])
heavy = ["pandas", "matplotlib", "torch", "transformers", "peft", "bitsandbytes", "pynvml", "accelerate"]
print(json.dumps({"status": rows[0].status, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def test_importing_the_report_core_stays_light():
    proc = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"status": "fits", "loaded": []}


@pytest.mark.extras("matplotlib")
def test_gpu_run_records_are_listed_with_estimate_over_measured(rows, tmp_path):
    """A CUDA run record of a model in the grid (a hand-made record: the numbers are test data) appears under
    "Measured on GPUs" with memplan's estimate for that setup on that card ÷ peak reserved + context; CPU
    records do not (they measure a CPU)."""
    from memplan.plan.estimate import estimate_for
    from memplan.catalog.gpus import gpu_from_device
    from memplan.catalog.models import load_model
    from memplan.measure.runs import RunRecord, save_run
    from memplan.plan.setup import resolve_setup

    spec = load_model("llama-3.2-1b")
    card = gpu_from_device("NVIDIA GeForce RTX 4090", 25_757_220_864, "8.9", source="test")
    setup = resolve_setup(TrainSetup("llama-3.2-1b", batch_size=4, seq_len=512, grad_ckpt=True), spec, card)
    env = {"device_name": "NVIDIA GeForce RTX 4090", "total_memory_bytes": 25_757_220_864, "compute_capability": "8.9"}
    runs = tmp_path / "runs"
    save_run(RunRecord(outcome="ok", setup=setup.to_dict(), device="cuda", environment=env,
                       peak={"max_reserved_bytes": 6 * 2**30, "cuda_context_bytes": 2**29}), runs)
    save_run(RunRecord(outcome="ok", setup=setup.to_dict(), device="cpu", peak={"tensor_peak_bytes": 2**30}), runs)
    write_capacity_report(rows, tmp_path / "out", ("md", "html"), runs_dir=runs)
    md = (tmp_path / "out" / "capacity.md").read_text()
    section = md.split("## Measured on GPUs", 1)[1].split("## How to read", 1)[0]
    ratio = estimate_for(spec, setup, card).total_bytes / (6.5 * 2**30)
    assert "1 GPU run record" in section and "NVIDIA GeForce RTX 4090" in section
    assert f"| {ratio:.3f} |" in section and "llama-3.2-1b 16b r8 q,v ×4 s512 ckpt" in section
    assert "Measured on GPUs" in (tmp_path / "out" / "capacity.html").read_text()
    write_capacity_report(rows, tmp_path / "none", ("md",), runs_dir=tmp_path / "missing")
    assert "No GPU run records" in (tmp_path / "none" / "capacity.md").read_text()


# Derived catalog models (their terms traced, shipped in profiles/derived/specs) in the default suite: one dense,
# one sliding-window hybrid, one MoE with eager attention; the others in the slow tier.
_DERIVED_FAST = ("qwen3-8b", "gemma-3-27b-pt", "gpt-oss-20b")


def _grid_models(slow: bool) -> list[str]:
    from memplan.catalog.models import list_models, load_model

    out = []
    for m in list_models():
        derived = load_model(m.id).derived
        if (derived and m.id not in _DERIVED_FAST) == slow:
            out.append(m.id)
    return out


@pytest.mark.parametrize("slow", [False, pytest.param(True, marks=(pytest.mark.slow, pytest.mark.skipif(
    not os.environ.get("MEMPLAN_DERIVED_ALL"), reason="the other derived catalog models: MEMPLAN_DERIVED_ALL=1")))],
    ids=["default", "derived"])
def test_every_capacity_cell_is_what_fit_answers(slow):
    """The whole default grid, every catalog model x the default cards x 512 / 2048 / 8192 tokens: each cell
    equals `memplan fit MODEL --gpu CARD --seq-len N` -- the same plan, or the same refusal. One rule for the
    sequence limit, one budget and one search serve both (the report used to mark rotary models n/a past
    max_position_embeddings while fit planned them)."""
    from memplan.errors import InvalidSetupError
    from memplan.reports.capacity import DEFAULT_GPUS

    models = _grid_models(slow)
    rows = capacity_rows(models, list(DEFAULT_GPUS), [512, 2048, 8192])
    assert len(rows) == len(models) * len(DEFAULT_GPUS) * 3
    for r in rows:
        try:
            res = _fit(r.model, r.gpu_id, r.seq_len)
        except InvalidSetupError as exc:
            assert r.status == "n/a", (r.model, r.gpu_id, r.seq_len, str(exc))
            continue
        where = (r.model, r.gpu_id, r.seq_len)
        assert (r.budget_bytes, r.usable_bytes) == (res.budget_bytes, res.usable_bytes), where
        if res.recommended is None:
            assert r.status == "no-fit" and r.leanest_peak_bytes == res.leanest.total_bytes, where
            continue
        s = res.recommended.setup
        assert r.status == "fits", where
        assert (r.bits, r.rank, r.targets, r.batch_size, r.grad_ckpt, r.optimizer, r.peak_bytes,
                r.max_seq_len_batch1) == (s.bits, s.rank, s.targets, s.batch_size, s.grad_ckpt, s.optimizer,
                                          res.recommended.total_bytes, res.max_seq_len_batch1), where


def test_progress_is_reported_per_cell():
    seen = []
    rows = capacity_rows(["llama-3.2-1b", "opt-1.3b"], ["3060"], [512, 2048],
                         progress=lambda done, total, cell: seen.append((done, total, cell)))
    assert [(d, t) for d, t, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)] and len(rows) == 4
    assert seen[0][2] == "llama-3.2-1b on RTX 3060 12GB at 512 tokens"


@pytest.mark.extras("matplotlib", "pandas")
def test_report_shows_progress_on_a_terminal_only(tmp_path):
    from tests.extras import run_with_tty_stderr

    cmd = [sys.executable, "-m", "memplan", "report", "capacity", "--models", "llama-3.2-1b,opt-1.3b", "--gpus",
           "3060", "--seq-len", "512", "--out", str(tmp_path / "tty")]
    code, out, seen = run_with_tty_stderr(cmd)
    assert code == 0
    assert b"capacity: the fit search per cell" in seen or b"on RTX 3060 12GB at 512 tokens" in seen
    assert "\x1b" not in out and out.splitlines()[-1].startswith("2 model x card x sequence cells")
    # a pipe gets no progress at all
    p = subprocess.run(cmd[:-1] + [str(tmp_path / "pipe")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == ""
