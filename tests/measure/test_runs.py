"""Run records: JSON round trip, atomic writes, schema versions, folder listing, file names (stdlib only)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

from memplan.measure import runs
from memplan.errors import MemplanError
from memplan.measure.runs import (
    SCHEMA_VERSION,
    RunRecord,
    RunRecordError,
    RunRecordWarning,
    list_runs,
    load_run,
    record_filename,
    save_run,
)

SETUP = {"model": "opt-125m", "method": "lora", "bits": 16, "quant_type": "nf4", "double_quant": True,
         "dtype": "bf16", "rank": 8, "alpha": 16, "targets": "q_proj,v_proj", "lora_dropout": 0.05,
         "adapter_dtype": "fp32", "optimizer": "adamw_torch", "batch_size": 4, "seq_len": 256, "grad_ckpt": False,
         "attn": "sdpa", "upcast_non_quantized": False, "gpu": None}


def _record(**kw) -> RunRecord:
    base = dict(outcome="ok", setup=dict(SETUP), device="cpu", steps=2, steps_completed=2,
                model={"name": "opt-125m", "model_type": "opt", "params_total": 125_239_296,
                       "params_trainable": 294_912, "params_quantized": 0},
                environment={"python": "3.11.7", "versions": {"torch": "2.13.0+cpu"}},
                phases=[{"name": "load", "step": None, "tensor_peak_bytes": 100, "max_reserved_bytes": None},
                        {"name": "forward", "step": 1, "tensor_peak_bytes": 250, "max_reserved_bytes": None}],
                peak={"tensor_peak_bytes": 250, "peak_phase": "forward", "peak_step": 1},
                wall_seconds=1.5, notes=["a note"])
    base.update(kw)
    return RunRecord(**base)


def _files(d):
    return sorted(p.name for p in d.iterdir())


def test_round_trip_through_json(tmp_path):
    rec = _record()
    path = save_run(rec, tmp_path / "runs")
    assert path.parent == tmp_path / "runs" and rec.path == str(path)
    back = load_run(path)
    assert back.to_dict() == rec.to_dict()
    assert back.path == str(path)
    assert back.schema_version == SCHEMA_VERSION == json.loads(path.read_text())["schema_version"]
    assert back.phase("forward", 1)["tensor_peak_bytes"] == 250 and back.tensor_peak_bytes == 250
    # the dict form is plain JSON and rebuilds the same record
    assert RunRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


def test_unknown_keys_survive_a_round_trip(tmp_path):
    d = _record().to_dict()
    d["future_field"] = {"x": 1}
    rec = RunRecord.from_dict(d)
    assert rec.extra == {"future_field": {"x": 1}}
    assert load_run(save_run(rec, tmp_path)).to_dict()["future_field"] == {"x": 1}


def test_write_is_atomic_when_serialisation_fails(tmp_path, monkeypatch):
    def broken_dump(obj, f, **kw):
        f.write('{"schema_version": 1, "outcome": "o')  # a partial write, then failure
        raise OSError("disk full")

    monkeypatch.setattr(runs.json, "dump", broken_dump)
    with pytest.raises(RunRecordError, match="disk full") as err:
        save_run(_record(), tmp_path)
    assert str(tmp_path) in str(err.value)
    assert _files(tmp_path) == []  # neither the record nor a stray temporary file


def test_interrupt_during_write_leaves_nothing_and_propagates(tmp_path, monkeypatch):
    def interrupted_dump(obj, f, **kw):
        f.write("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(runs.json, "dump", interrupted_dump)
    with pytest.raises(KeyboardInterrupt):
        save_run(_record(), tmp_path)
    assert _files(tmp_path) == []


def test_save_never_overwrites(tmp_path):
    a, b = _record(run_id="same"), _record(run_id="same")
    pa, pb = save_run(a, tmp_path), save_run(b, tmp_path)
    assert pa != pb and len(_files(tmp_path)) == 2


def test_unknown_schema_version_is_a_clear_error(tmp_path):
    d = _record().to_dict()
    d["schema_version"] = 99
    p = tmp_path / "future.json"
    p.write_text(json.dumps(d))
    with pytest.raises(RunRecordError, match=r"schema_version 99 .*reads version 1") as err:
        load_run(p)
    assert str(p) in str(err.value)
    assert isinstance(err.value, MemplanError)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("schema_version"), "no schema_version"),
    (lambda d: d.pop("setup"), "'setup'"),
    (lambda d: d.update(outcome="maybe"), "invalid outcome 'maybe'"),
    (lambda d: d.update(phases={"a": 1}), "'phases' must be a JSON array"),
])
def test_malformed_records_are_rejected(tmp_path, mutate, match):
    d = _record().to_dict()
    mutate(d)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    with pytest.raises(RunRecordError, match=match):
        load_run(p)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(RunRecordError, match="no such run record"):
        load_run(tmp_path / "missing.json")
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(RunRecordError, match=r"broken\.json: invalid JSON at line 1"):
        load_run(p)


def test_list_runs_skips_unreadable_files_with_a_warning(tmp_path):
    older = save_run(_record(created="2024-01-01T00:00:00+00:00", run_id="a"), tmp_path)
    newer = save_run(_record(created="2025-01-01T00:00:00+00:00", run_id="b"), tmp_path)
    (tmp_path / "corrupt.json").write_text('{"schema_version": 1, "outcome"')
    future = _record().to_dict() | {"schema_version": 2}
    (tmp_path / "future.json").write_text(json.dumps(future))
    (tmp_path / ".inflight.json.tmp").write_text("{")  # a writer's temporary file: ignored
    (tmp_path / "notes.txt").write_text("not a record")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = list_runs(tmp_path)
    assert [r.path for r in found] == [str(older), str(newer)]  # oldest first
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in found.skipped) == ["corrupt.json", "future.json"]
    assert all(issubclass(w.category, RunRecordWarning) for w in caught) and len(caught) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list_runs(tmp_path, warn=False)) == 2


def test_list_runs_of_missing_folder_is_empty_and_of_a_file_is_an_error(tmp_path):
    assert list_runs(tmp_path / "nothing-yet") == []
    f = tmp_path / "file.json"
    f.write_text("{}")
    with pytest.raises(RunRecordError, match="not a folder"):
        list_runs(f)


def test_file_names_are_readable_and_safe():
    rec = _record(run_id="20250102T030405Z-1a2b3c4d")
    assert record_filename(rec) == "opt-125m__cpu__16b-r8-bs4-s256__20250102T030405Z-1a2b3c4d.json"
    local = _record(setup=dict(SETUP, model="/data/my model/config.json", method="full", bits=32), device="cuda",
                    run_id="x")
    assert record_filename(local) == "my_model__cuda__32b-full-bs4-s256__x.json"
    hub = _record(setup=dict(SETUP, model="meta-llama/Llama-2-7b-hf.json"), run_id="y")
    assert record_filename(hub).startswith("Llama-2-7b-hf__cpu__")


def test_runs_module_does_not_import_torch():
    code = "import sys, memplan.measure.runs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_records_are_ordinary_files(tmp_path):
    """write_atomic's temporary file is 0600 (mkstemp); the record ends up 0666 minus the umask like any file."""
    import os
    import stat

    from memplan.measure.runs import RunRecord, save_run

    mask = os.umask(0o022)
    try:
        path = save_run(RunRecord(outcome="ok", setup={"model": "opt-125m"}, device="cpu"), tmp_path)
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
