"""Running ``memplan`` in-process from a test: its exit code and what it printed (``capsys``), and writing a small
config file to read. Shared by the CLI and config tests."""

from __future__ import annotations

import json

from memplan.cli import main


def run(capsys, *argv):
    """``memplan *argv``: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    """``memplan *argv --json``, which must succeed: the parsed JSON."""
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def write(tmp_path, name, content):
    """``content`` (text, or a dict / list written as JSON) in ``tmp_path/name``; its path as a string."""
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(p)
