"""At 80 columns nothing is cut: no line wider than the terminal, no ``…`` in a cell, and the names a user must
type (optimizers, model ids, card names) come out whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from memplan.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

COMMANDS = [
    ["fit", "opt-13b", "--gpu", "3090"],
    ["fit", "opt-13b", "--gpu", "3090", "--prefer", "quality"],
    ["fit", "llama-2-7b", "--gpu", "3060", "--optimizer", "paged_adamw_8bit"],
    ["fit", "llama-2-7b", "--gpu", "3060", "--prefer", "memory"],
    ["fit", "llama-3.1-405b", "--gpu", "4090"],
    ["fit", "opt-13b", "--gpu", "3090", "--max-batch", "4"],
    ["estimate", "opt-13b", "--gpu", "3090", "--phases"],
    ["estimate", "mixtral-8x7b", "--bits", "4", "--targets", "all-linear", "--lora-dropout", "0"],
    ["gpus"],
    ["models"],
]


def _out(capsys, monkeypatch, argv) -> str:
    monkeypatch.setenv("COLUMNS", "80")
    main(argv)
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_nothing_is_cut_at_80_columns(capsys, monkeypatch, argv):
    out = _out(capsys, monkeypatch, argv)
    assert out.strip()
    wide = [line for line in out.splitlines() if len(line.rstrip()) > 80]
    assert not wide, wide
    assert "…" not in out


def test_names_come_out_whole(capsys, monkeypatch):
    out = _out(capsys, monkeypatch, ["fit", "llama-2-7b", "--gpu", "3060", "--optimizer", "paged_adamw_8bit"])
    table = out[out.index("Alternatives"):out.index("* recommended")].splitlines()[2:]
    assert len(table) >= 3 and all(" paged_adamw_8bit " in line for line in table)
    gpus = _out(capsys, monkeypatch, ["gpus"])
    for card in ("RTX 6000 Ada Generation", "V100-SXM2-32GB", "RTX 4060 Ti 16GB"):
        assert card in gpus
    models = _out(capsys, monkeypatch, ["models"])
    for hf_id in ("openai-community/gpt2-medium", "microsoft/Phi-3-mini-4k-instruct", "meta-llama/Llama-3.1-405B"):
        assert hf_id in models
