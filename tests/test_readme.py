"""Every output the README shows is real and current: this test regenerates each one and fails on drift.

An output block in README.md is a fenced block that either

- starts with ``$ memplan ...`` lines: each command runs (``python -m memplan``, 80 columns, no colour, stderr
  folded into stdout as a terminal shows it) and its output must equal the lines under it; or
- follows a ``<!-- readme: output=NAME -->`` comment: ``GENERATORS[NAME]`` makes it (Python API output, a file
  the README quotes).

The comment before a block may also say ``cwd=DIR`` (where the commands run, relative to the repository),
``exit=N`` (the exit status of every command in the block; default 0) and ``needs=a,b`` (optional modules; the
block is skipped without them). A block whose last line is ``...`` shows the beginning of the output only. A
``text`` block that is neither kind fails: every example shows its command.

After a deliberate change of output, ``python tests/test_readme.py --update`` rewrites the blocks.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COLUMNS = 80
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
_MARK = re.compile(r"<!-- readme: (.*?) -->\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    body: str
    start: int  # offsets of the body in the README text
    end: int
    attrs: dict[str, str]

    @property
    def id(self) -> str:
        return f"README.md:{self.line}"


def blocks(text: str) -> list[Block]:
    out = []
    for m in _FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = _MARK.search(before)
        attrs = dict(kv.split("=", 1) for kv in mark.group(1).split()) if mark else {}
        out.append(Block(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2), m.start(2), m.end(2), attrs))
    return out


def _is_output(b: Block) -> bool:
    return "output" in b.attrs or b.body.startswith("$ ")


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip("\n").split("\n")]


def run_command(command: str, cwd: Path) -> tuple[int, str]:
    argv = shlex.split(command)
    assert argv[0] == "memplan", f"README commands start with memplan: {command!r}"
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "MEMPLAN_PROFILES")}
    env.update(COLUMNS=str(COLUMNS), NO_COLOR="1", TERM="dumb", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "memplan", *argv[1:]], cwd=cwd, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=300)
    return p.returncode, p.stdout


def _commands(body: str) -> list[tuple[str, list[str]]]:
    """``$ cmd`` lines with the output shown under each."""
    out: list[tuple[str, list[str]]] = []
    for line in _lines(body):
        if line.startswith("$ "):
            out.append((line[2:], []))
        else:
            out[-1][1].append(line)
    return out


def _truncate_like(shown: list[str], actual: list[str]) -> list[str]:
    """``actual`` cut as ``shown`` is: the same number of lines, then ``...``."""
    if shown and shown[-1] == "...":
        return actual[:len(shown) - 1] + ["..."]
    return actual


def regenerate(b: Block) -> str:
    """The body ``b`` should have, from the commands or generator it names."""
    missing = [m for m in b.attrs.get("needs", "").split(",") if m and importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"README block at line {b.line} needs {', '.join(missing)}")
    if "output" in b.attrs:
        actual = _lines(GENERATORS[b.attrs["output"]]())
        return "\n".join(_truncate_like(_lines(b.body), actual)) + "\n"
    cwd = ROOT / b.attrs.get("cwd", ".")
    status = int(b.attrs.get("exit", "0"))
    parts = []
    for command, shown in _commands(b.body):
        code, output = run_command(command, cwd)
        assert code == status, f"{b.id}: `{command}` exited {code}, README says {status}:\n{output}"
        parts += [f"$ {command}", *_truncate_like(shown, _lines(output))]
    return "\n".join(parts) + "\n"


# --- generators: outputs that are not a memplan command ------------------------------------------------------

def _preflight_wontfit() -> str:
    from peft import LoraConfig

    import memplan

    try:
        memplan.preflight("llama-2-7b-hf", training_args={"per_device_train_batch_size": 8, "bf16": True},
                          lora_config=LoraConfig(r=16, target_modules=["q_proj", "v_proj"]), seq_len=1024, gpu="3090")
    except memplan.WontFitError as exc:
        return f"memplan.errors.WontFitError: {exc}"
    raise AssertionError("the README's preflight example fits now: change the example")


def _capacity_table() -> str:
    from memplan.reports.capacity import DEFAULT_GPUS, capacity_rows
    from memplan.reports.capacity_docs import markdown

    rows = capacity_rows(["mistral-7b-v0.1", "llama-2-13b-hf", "qwen2.5-14b"], DEFAULT_GPUS, [512])
    lines = markdown(rows, [], "memplan report capacity").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("| "))
    return "\n".join(lines[start:end])  # the first table: the matrix, not the plan details


def _capacity_frame() -> str:
    import pandas as pd

    from memplan.reports.capacity import capacity_frame

    df = capacity_frame(["llama-3.1-8b", "llama-3.1-70b"], ["4090", "a100"], [512, 2048])
    with pd.option_context("display.width", COLUMNS):
        return df[df.status == "fits"][["model", "gpu", "seq_len", "bits", "rank", "batch_size",
                                         "peak_bytes"]].to_string()


# (regime, where it comes from, memplan flags) for the README's precision table
PRECISION_REGIMES = (
    ("16-bit weights, no autocast", "torchtune, litgpt bf16-true, peft's benchmarks", dict(bits=16, autocast="off")),
    ("16-bit weights under autocast", "TRL / axolotl, dtype=bf16 + bf16=True", dict(bits=16, autocast="bf16")),
    ("fp32 master weights under autocast", "the Trainer's classic AMP", dict(bits=32, autocast="bf16")),
    ("4-bit, prepared, under autocast", "QLoRA scripts (the default at 4 bits)", dict(bits=4, autocast="bf16")),
    ("4-bit, prepared, no autocast", "QLoRA with bf16=False", dict(bits=4, autocast="off")),
    ("4-bit, not prepared, under autocast", "FSDP-QLoRA-style scripts",
     dict(bits=4, upcast_non_quantized=False, autocast="bf16")),
    ("4-bit, not prepared, no autocast", "pure bf16 around 4-bit weights",
     dict(bits=4, upcast_non_quantized=False, autocast="off")),
)


def _precision_table() -> str:
    from memplan.plan.estimate import estimate
    from memplan.plan.setup import TrainSetup

    flags = {"bits": "--bits", "autocast": "--autocast", "upcast_non_quantized": "--upcast"}
    lines = [f"{'regime':<37} {'flags':<37} {'peak GiB':>8}  produced by"]
    for name, where, knobs in PRECISION_REGIMES:
        e = estimate(TrainSetup("llama-3.1-8b", rank=16, targets="all-linear", batch_size=4, seq_len=1024,
                                grad_ckpt=True, **knobs), gpu="4090")
        shown = " ".join("--no-upcast" if k == "upcast_non_quantized" else f"{flags[k]} {v}" for k, v in knobs.items())
        lines.append(f"{name:<37} {shown:<37} {e.total_bytes / 2**30:>8.2f}  {where}")
    return "\n".join(lines)


def _published_summary() -> str:
    from memplan.measure.published import load_published, score_published
    from memplan.reports.published import FRAMEWORK_LABELS, summarize

    s = summarize(score_published(load_published(ROOT / "profiles" / "published" / "measurements.csv")))
    lines = [f"{'framework (grade A/B rows)':<52} {'rows':>4} {'median |err|':>12} {'worst |err|':>11}"]
    for fw, st in s["ab_by_framework"].items():
        lines.append(f"{FRAMEWORK_LABELS[fw]:<52} {st['n']:>4} {100 * st['median_abs_error']:>11.1f}% "
                     f"{100 * st['worst_abs_error']:>10.1f}%")
    ab = s["ab"]
    lines.append(f"{'all':<52} {ab['n']:>4} {100 * ab['median_abs_error']:>11.1f}% "
                 f"{100 * ab['worst_abs_error']:>10.1f}%")
    lines.append(f"claims (OOM on X / fits in X) answered right: {s['claims_right']} of {s['claims']}; "
                 f"rows skipped with a reason: {s['skipped']} of {s['rows']}")
    return "\n".join(lines)


def _example_script() -> str:
    return (ROOT / "examples" / "train_qlora.py").read_text()


GENERATORS = {"preflight-wontfit": _preflight_wontfit, "capacity-table": _capacity_table,
              "capacity-frame": _capacity_frame, "example-script": _example_script,
              "precision-table": _precision_table, "published-summary": _published_summary}


# --- the tests ------------------------------------------------------------------------------------------------

_BLOCKS = blocks(README.read_text())


def test_every_text_block_shows_its_command_or_source():
    bare = [b.line for b in _BLOCKS if b.lang == "text" and not _is_output(b)]
    assert not bare, f"README text blocks without a `$ memplan` command or a readme: output= mark: lines {bare}"
    unknown = [b.attrs["output"] for b in _BLOCKS if b.attrs.get("output", "") not in ("", *GENERATORS)]
    assert not unknown, f"README names generators this test does not have: {unknown}"


@pytest.mark.parametrize("block", [b for b in _BLOCKS if _is_output(b)], ids=lambda b: b.id)
def test_readme_output_is_current(block):
    expected = regenerate(block)
    assert _lines(block.body) == _lines(expected), (
        f"{block.id} drifted from what memplan prints now; if the change is deliberate, run "
        f"`python tests/test_readme.py --update` and read the diff")


def update() -> int:
    """Rewrite every output block in README.md with what it regenerates to."""
    text = README.read_text()
    changed = 0
    for b in reversed(blocks(text)):
        if not _is_output(b):
            continue
        try:
            new = regenerate(b)
        except pytest.skip.Exception as exc:
            print(f"skipped {b.id}: {exc}", file=sys.stderr)
            continue
        if _lines(new) != _lines(b.body):
            text, changed = text[:b.start] + new + text[b.end:], changed + 1
    from memplan.fileio import write_atomic

    write_atomic(README, lambda f: f.write(text))
    print(f"{changed} README block(s) rewritten", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_readme.py --update")
    sys.exit(update())
