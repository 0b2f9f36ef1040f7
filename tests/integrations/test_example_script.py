"""examples/train_qlora.py, the README's training script: the try-out command its docstring gives (the shipped
examples/tiny-llama config, default flags, the CPU), a checkpoint folder, and its errors (one line naming the
script's own flags, no traceback). Each run is a subprocess in a temporary folder (the script writes memplan-runs/
where it runs)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from tests.extras import require  # noqa: E402

EXTRAS = require('torch', 'transformers', 'peft', 'bitsandbytes')
import torch  # noqa: E402

pytestmark = [EXTRAS]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train_qlora.py"
TINY = ROOT / "examples" / "tiny-llama"


def _run(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _docstring_command() -> list[str]:
    """The try-out command of the script's docstring, with its repo-relative paths made absolute."""
    import ast

    doc = ast.get_docstring(ast.parse(SCRIPT.read_text()))
    (line,) = [ln.strip() for ln in doc.splitlines() if "examples/tiny-llama" in ln and ln.strip().startswith("python")]
    words = shlex.split(line)[1:]
    return [str(ROOT / w) if w.startswith("examples/") else w for w in words]


def _no_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")


def test_the_docstring_command_trains_the_tiny_config_on_the_cpu(tmp_path):
    """The docstring's one command: the shipped config.json (no weights: random ones), the default flags (a few
    steps of short sequences), a run record; no FutureWarning, and no CUDA context called the largest part."""
    cmd = _docstring_command()
    assert cmd[:2] == [str(SCRIPT), str(TINY)] and "--cpu" in cmd
    assert not any(flag in cmd for flag in ("--steps", "--seq-len", "--batch-size"))  # the defaults
    out = _run(cmd, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FutureWarning" not in out.stderr, out.stderr
    assert "cuda_context" not in out.stdout + out.stderr
    assert "largest tensor part:" in out.stdout
    (record,) = (tmp_path / "memplan-runs").glob("tiny-llama__*.json")
    data = json.loads(record.read_text())
    assert data["outcome"] == "ok" and data["setup"]["bits"] == 4 and data["setup"]["rank"] == 16
    assert data["setup"]["grad_ckpt"] is True  # checkpointing, turned on by TrainingArguments' new name
    assert 0 < data["steps_completed"] == data["steps"] <= 10 and data["setup"]["seq_len"] <= 256
    assert f"memplan: run record {Path('memplan-runs') / record.name}" in out.stdout


def test_the_script_trains_a_checkpoint_folder(tmp_path):
    """A folder with weights (the tiny config saved as a checkpoint) loads through from_pretrained as is."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = tmp_path / "tiny-ckpt"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY), dtype=torch.bfloat16).save_pretrained(ckpt)
    out = _run([SCRIPT, ckpt, "--seq-len", "32", "--steps", "2", "--cpu", "--gpu", "3090"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "holds no weights" not in out.stdout and "FutureWarning" not in out.stderr
    (record,) = (tmp_path / "memplan-runs").glob("tiny-ckpt__*.json")
    data = json.loads(record.read_text())
    assert data["outcome"] == "ok" and data["steps_completed"] == 2 and data["setup"]["seq_len"] == 32


@pytest.mark.parametrize("flags", [["--cpu"], []], ids=["cpu", "no-flags"])
def test_without_a_budget_and_a_gpu_it_names_its_flags(tmp_path, flags):
    """No GPU and no --budget-gib / --gpu: one line naming the script's flags (not preflight's Python arguments),
    no traceback, a non-zero exit, nothing loaded."""
    _no_gpu()
    out = _run([SCRIPT, TINY, *flags], tmp_path)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "budget_bytes=" not in out.stderr and "gpu=" not in out.stderr
    ours = [ln for ln in out.stderr.splitlines() if ln.startswith("train_qlora.py:")]
    assert len(ours) == 1 and ours[0] == out.stderr.strip().splitlines()[-1]
    assert "--budget-gib 12" in ours[0] and "--gpu 3090" in ours[0]
    assert ("--cpu" in ours[0]) == (not flags)
    assert not (tmp_path / "memplan-runs").exists()


def test_a_plan_that_will_not_fit_stops_with_the_breakdown_and_the_flags(tmp_path):
    out = _run([SCRIPT, TINY, "--cpu", "--budget-gib", "0.01"], tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "will not fit" in out.stderr and "Where it goes" in out.stderr  # memplan's breakdown
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("train_qlora.py:") and "--batch-size" in last and "--seq-len" in last
    assert not (tmp_path / "memplan-runs").exists()


@pytest.mark.parametrize("flags, named", [
    (["--gpu", "rtx 3009"], "did you mean"),  # a memplan error: its message, one line, no traceback
    (["--budget-gib", "0"], "--budget-gib: expected a positive float"),  # argparse
    (["--steps", "many"], "--steps: expected a positive int"),
])
def test_bad_flags_are_one_line(tmp_path, flags, named):
    out = _run([SCRIPT, TINY, "--cpu", *flags], tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert named in out.stderr.strip().splitlines()[-1]


def test_the_readme_shows_the_script_verbatim():
    """README.md shows examples/train_qlora.py verbatim: regenerate its copy when the script changes."""
    assert SCRIPT.read_text() in (ROOT / "README.md").read_text()
