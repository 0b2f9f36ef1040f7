"""Planning must not import torch, transformers, peft, bitsandbytes, pynvml or accelerate."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["torch", "transformers", "peft", "bitsandbytes", "pynvml", "accelerate", "pandas", "matplotlib"]

SCRIPT = """
import contextlib, io, json, sys
from memplan.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    codes = [main(["fit", "opt-13b", "--gpu", "3090"]), main(["estimate", "llama-2-7b", "--bits", "4"]),
             main(["models", "--json"]), main(["gpus", "--json"]), main(["fit", "mistral-7b-v0.1", "--gpu", "a6000", "--json"])]
heavy = %r
print(json.dumps({"codes": codes, "loaded": sorted(m for m in heavy if m in sys.modules)}))
"""


def test_planning_leaves_heavy_packages_unimported():
    proc = subprocess.run([sys.executable, "-c", SCRIPT % HEAVY], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0, 0, 0, 0]
    assert result["loaded"] == []


def test_import_memplan_is_cheap():
    proc = subprocess.run([sys.executable, "-c", "import sys, memplan; print(sorted(m for m in sys.modules if m.startswith('memplan')))"],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "['memplan']"


CONFIG_SCRIPT = """
import contextlib, io, json, sys
import memplan.integrations.training_configs
from memplan.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    codes = [main(["estimate", "--model", "llama-2-7b", "--config", "tests/fixtures/training_args.json",
                   "--config", "tests/fixtures/adapter_config.json", "--config", "tests/fixtures/bnb_config.json"])]
heavy = %r
print(json.dumps({"codes": codes, "loaded": sorted(m for m in heavy if m in sys.modules)}))
"""


def test_json_training_configs_leave_heavy_packages_and_yaml_unimported():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", CONFIG_SCRIPT % (HEAVY + ["yaml"])], capture_output=True, text=True,
                          check=True, cwd=root)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0]
    assert result["loaded"] == []
