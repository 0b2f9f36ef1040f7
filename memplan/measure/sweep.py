"""Profile sweeps: one ``profile_run`` per batch size until out of memory, optionally each in a fresh process.

On CUDA every batch size runs in its own Python process by default (``isolate``), so that no run inherits the
previous one's CUDA context, cached blocks, cuBLAS workspace or bitsandbytes' never-freed paged memory
(``memplan.measure.nvml``). The child is a plain subprocess running ``isolated_main`` (not multiprocessing's
spawn, which re-imports the parent's ``__main__``: ``python -m memplan`` has no ``if __name__ == "__main__"``
guard). The request goes in on stdin as JSON, the record comes back in a JSON file; the child's stdout/stderr
go to a log whose tail is kept in the record when the child dies.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from memplan.errors import MemplanError
from memplan.fileio import write_atomic

from .profile import ProfileError, RunControl, RunInterrupted, check_profile_args, profile_run
from .runs import RunRecord, save_run

__all__ = ["DEFAULT_MAX_BATCH", "default_batch_sizes", "profile_sweep", "isolated_main"]

DEFAULT_MAX_BATCH = 256
_CHILD_CODE = "from memplan.measure.sweep import isolated_main; isolated_main()"


def default_batch_sizes(start: int = 1, max_batch_size: int = DEFAULT_MAX_BATCH) -> list[int]:
    """``start, 2*start, 4*start, ...`` up to ``max_batch_size``."""
    if start < 1 or max_batch_size < start:
        raise ProfileError(f"invalid batch range {start}..{max_batch_size}")
    out, b = [], start
    while b <= max_batch_size:
        out.append(b)
        b *= 2
    return out


def profile_sweep(setup, *, batch_sizes: Sequence[int] | None = None, max_batch_size: int = DEFAULT_MAX_BATCH,
                  out_dir: str | os.PathLike, device: str = "cpu", steps: int = 3,
                  gpu_memory_fraction: float | None = None, tensor_budget_bytes: int | None = None,
                  profiles_dir=None, seed: int = 0, on_record: Callable[[RunRecord], None] | None = None,
                  progress: bool = True, isolate: bool | None = None,
                  control: RunControl | None = None) -> list[RunRecord]:
    """One ``profile_run`` per batch size (default 1, 2, 4, ... ``max_batch_size``), each record saved to
    ``out_dir`` as soon as it finishes; stops after the first run that is not ``ok`` (an out-of-memory is the
    answer a sweep looks for; an error would repeat at every larger batch).

    ``isolate`` (default: on for cuda) runs every batch size in a fresh Python process, so that no run inherits
    the previous one's CUDA context, cached blocks, cuBLAS workspace or bitsandbytes' never-freed paged memory.
    ``on_record(record)`` is called after each save. A rich progress bar goes to stderr when ``progress`` and
    stderr is a terminal. Ctrl-C: finished records are already on disk, the interrupted run is saved with
    outcome ``"interrupted"``, then the ``KeyboardInterrupt`` propagates.
    """
    check_profile_args(device, steps, gpu_memory_fraction, tensor_budget_bytes)
    sizes = list(batch_sizes) if batch_sizes is not None else default_batch_sizes(1, max_batch_size)
    bad = [b for b in sizes if not isinstance(b, int) or isinstance(b, bool) or b < 1]
    if not sizes or bad:
        raise ProfileError(f"invalid batch sizes {sizes!r}; need positive integers")
    isolate = device == "cuda" if isolate is None else isolate
    # Bad setups fail here, with their own error, before any run (pure Python: the parent of isolated runs must
    # not create a CUDA context, which would take memory from the runs on the same card).
    from memplan.catalog.models import load_model
    from memplan.plan.setup import resolve_setup

    resolve_setup(setup, load_model(setup.model, profiles_dir=profiles_dir), None)
    kwargs = dict(device=device, steps=steps, gpu_memory_fraction=gpu_memory_fraction,
                  tensor_budget_bytes=tensor_budget_bytes, profiles_dir=profiles_dir, seed=seed)
    records: list[RunRecord] = []
    with _progress(progress, len(sizes)) as bar:
        for b in sizes:
            bar.start(f"batch {b}")
            one = setup.with_(batch_size=b)
            try:
                rec = _run_isolated(one, kwargs) if isolate else profile_run(one, control=control, **kwargs)
            except RunInterrupted as exc:
                save_run(exc.record, out_dir)
                records.append(exc.record)
                if on_record is not None:
                    on_record(exc.record)
                raise
            save_run(rec, out_dir)
            records.append(rec)
            if on_record is not None:
                on_record(rec)
            bar.done(f"batch {b}: {rec.outcome}" + _peak_text(rec))
            if rec.outcome != "ok":
                break
    return records


def _peak_text(rec: RunRecord) -> str:
    from memplan.units import format_bytes

    p = rec.peak or {}
    v = p.get("max_reserved_bytes") if rec.device == "cuda" else None
    v = v if v is not None else p.get("tensor_peak_bytes")
    return f", peak {format_bytes(v)}" if v is not None else ""


class _Bar:
    def __init__(self, progress, task):
        self._p, self._t = progress, task

    def start(self, text: str) -> None:
        if self._p is not None:
            self._p.update(self._t, description=text)

    def done(self, text: str) -> None:
        if self._p is not None:
            self._p.update(self._t, advance=1, description=text)


@contextmanager
def _progress(enabled: bool, total: int):
    """A rich progress bar on stderr, or a no-op when disabled or stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield _Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as p:
        yield _Bar(p, p.add_task("profiling", total=total))



def isolated_main() -> None:  # pragma: no cover - runs in the child process
    import json
    import signal

    from memplan.plan.setup import TrainSetup

    def first_interrupt_only(signum, frame):
        # The terminal's Ctrl-C and the parent's forwarded SIGINT may both arrive: the first one interrupts the
        # run, later ones must not break the hand-over of the partial record.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, first_interrupt_only)
    req = json.loads(sys.stdin.read())
    try:
        rec = profile_run(TrainSetup(**req["setup"]), **req["kwargs"])
        msg = {"kind": "record", "record": rec.to_dict()}
    except RunInterrupted as exc:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the hand-over
        msg = {"kind": "interrupted", "record": exc.record.to_dict()}
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        msg = {"kind": "interrupted", "record": None}
    except BaseException as exc:  # noqa: BLE001 - e.g. InvalidSetupError: re-raised in the parent
        mine = isinstance(exc, MemplanError)
        msg = {"kind": "raise", "message": str(exc) if mine else f"{type(exc).__name__}: {exc}", "memplan": mine}
    write_atomic(req["result"], lambda f: json.dump(msg, f))  # the parent reads it whole or not at all


def _placeholder_record(setup, kwargs: dict, outcome: str, error: str, error_type: str) -> RunRecord:
    from .recorder import StepRecorder

    rec = RunRecord(outcome=outcome, setup=setup.to_dict(), device=kwargs["device"], steps=kwargs["steps"],
                    error=error, error_type=error_type)
    StepRecorder(track_tensors=False).summarize(rec)
    return rec


def _run_isolated(setup, kwargs: dict) -> RunRecord:
    """``profile_run(setup, **kwargs)`` in a fresh Python process; returns its record (or raises what it
    raised: ``ProfileError`` / ``RunInterrupted``)."""
    import json
    import signal
    import subprocess

    req_kwargs = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in kwargs.items()}
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])  # the child imports this very memplan
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory(prefix="memplan-run-") as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        request = json.dumps({"setup": setup.to_dict(), "kwargs": req_kwargs, "result": str(result)})
        interrupted = False
        with open(log, "wb") as logf:
            proc = subprocess.Popen([sys.executable, "-c", _CHILD_CODE], stdin=subprocess.PIPE, stdout=logf,
                                    stderr=subprocess.STDOUT, env=env)
            try:
                proc.stdin.write(request.encode())
                proc.stdin.close()
                proc.wait()
            except KeyboardInterrupt:
                # The terminal's Ctrl-C reaches the child too (same process group); make sure it does, then let
                # it write its partial record.
                interrupted = True
                try:
                    proc.wait(timeout=5)  # it got the same Ctrl-C: give it time to write its record
                except subprocess.TimeoutExpired:
                    try:
                        proc.send_signal(signal.SIGINT)  # only the parent was signalled: forward it
                    except OSError:
                        pass
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        msg = None
        if result.exists():
            try:
                msg = json.loads(result.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                msg = None
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:] if log.exists() else ""
    if interrupted or (msg is not None and msg["kind"] == "interrupted"):
        rec = RunRecord.from_dict(msg["record"]) if msg and msg.get("record") else None
        if rec is None:
            rec = _placeholder_record(setup, kwargs, "interrupted", "interrupted", "KeyboardInterrupt")
        rec.outcome = "interrupted"
        raise RunInterrupted(rec)
    if msg is None:
        code = proc.returncode
        why = " (SIGKILL: possibly the Linux out-of-memory killer)" if code == -9 else ""
        rec = _placeholder_record(setup, kwargs, "error", f"the profiling process died with exit code {code}{why}",
                                  "ProcessDied")
        rec.extra["log_tail"] = tail
        return rec
    if msg["kind"] == "record":
        return RunRecord.from_dict(msg["record"])
    if msg.get("memplan"):
        raise ProfileError(msg["message"])
    raise ProfileError(f"the profiling process failed: {msg['message']}")
