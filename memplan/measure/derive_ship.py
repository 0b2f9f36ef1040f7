"""Ship derivations with memplan: ``python -m memplan.measure.derive_ship [catalog ids ...]``.

For each catalog model whose ``model_type`` has no hand-written family (all of them when no id is given), derive
the spec from transformers' module tree and trace every regime ``memplan fit`` searches on the cards in
``CARDS``, then write ``profiles/derived/specs/<sha256 of the config>.json`` (``memplan.catalog.models.derive``).
With that file ``memplan fit <id>`` plans at once and without torch or transformers. Each file records the
library stack it was traced on; rerun this after a transformers upgrade changes a model's modules or kernels
(``tests/catalog/test_shipped.py`` rederives the specs and retraces a regime to catch that).

The traces run into a temporary cache, never the user's, and ignore any shipped file they replace. Progress goes
to stderr; writes are atomic, so an interrupted run leaves the previous files whole.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from memplan.fileio import write_atomic

__all__ = ["ship", "derived_catalog_ids", "CARDS", "main"]

# The capacity report's default cards (memplan.reports.capacity.DEFAULT_GPUS), 12 to 80 GB, all bf16: the search
# visits every bits x rank x targets x checkpointing regime on each, and the leaner-regime alternatives and the
# longest-sequence search (sliding-window masks) differ with the budget.
CARDS = ("rtx-3060-12gb", "rtx-4080", "rtx-4090", "a100-40gb", "l40s", "rtx-a6000", "a100-80gb", "h100-80gb")
# memplan fit's default sequence and the capacity report's: past a sliding window, SDPA gets an explicit mask,
# another regime (memplan.plan.derived.regime_key)
SEQ_LENS = (512, 2048, 8192)


def derived_catalog_ids(profiles_dir=None) -> list[str]:
    """The catalog models without a hand-written family."""
    from memplan.catalog.models import SUPPORTED_MODEL_TYPES, list_models
    from memplan.catalog import paths

    out = []
    for m in list_models(profiles_dir=profiles_dir):
        if paths.read_json(m.path)["config"].get("model_type") not in SUPPORTED_MODEL_TYPES:
            out.append(m.id)
    return out


def ship(model_id: str, *, out_dir: Path | None = None, cards=CARDS, fresh=False, progress=True) -> Path:
    """Derive and trace ``model_id`` (a catalog id); write and return its shipped file. The regimes of a shipped
    file whose spec the installed transformers still derives are kept unless ``fresh``."""
    from memplan.catalog import paths
    from memplan.catalog.gpus import load_gpu
    from memplan.catalog.models import derive, list_models
    from memplan.plan import derived
    from memplan.plan.search import fit_for
    from memplan.plan.setup import TrainSetup, resolve_setup
    from memplan.plan.estimate import estimate_for
    from memplan.plan.versions import default_stack

    entry = next((m for m in list_models() if m.id == model_id), None)
    if entry is None:
        raise SystemExit(f"memplan: {model_id!r} is not a catalog id")
    config = paths.read_json(entry.path)["config"]
    target = (out_dir or derive.shipped_dir()) / f"{derive.config_key(config)}.json"  # before anything reads it
    version = derive.transformers_version()
    if version is None:
        raise SystemExit("memplan: shipping derivations needs transformers (pip install 'memplan[profile]')")
    t0 = time.perf_counter()
    old_cache = os.environ.get("MEMPLAN_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="memplan-ship-") as tmp:
        os.environ["MEMPLAN_CACHE_DIR"] = tmp
        derived.clear_memo()
        derive.forget_shipped()  # trace from scratch, not on top of the file being replaced
        try:
            fields_ = derive.derive_from_transformers(config, model_id)
            key = derive.cache_key(config, version)
            stored = derive.spec_to_dict(fields_)
            old = None if fresh else derive.read_shipped(config)
            kept = old["regimes"] if old is not None and old["spec"] == stored else {}
            derive.update_entry(key, lambda e: {**e, "spec": stored, "regimes": dict(kept)})
            spec = derive.derived_model_spec(fields_, config, key, name=entry.id, hf_id=entry.hf_id,
                                             source=entry.source)
            estimate_for(spec, resolve_setup(TrainSetup(model=entry.id), spec))  # memplan estimate's default
            window = spec.sliding_window
            seqs = [s for s in SEQ_LENS if s == SEQ_LENS[0] or (window and s >= window)]
            for card in cards:
                gpu = load_gpu(card)
                for seq in seqs:
                    if progress:
                        print(f"memplan: {model_id}: the regimes of memplan fit --gpu {card} --seq-len {seq} ...",
                              file=sys.stderr, flush=True)
                    fit_for(spec, TrainSetup(model=entry.id, seq_len=seq), gpu, pinned=frozenset({"seq_len"}))
            cached = derive.read_entry(key)
        finally:
            derived.clear_memo()
            if old_cache is None:
                os.environ.pop("MEMPLAN_CACHE_DIR", None)
            else:
                os.environ["MEMPLAN_CACHE_DIR"] = old_cache
    path, target_dir = target, target.parent
    data = {"format": derive.FORMAT, "id": entry.id, "model_type": config["model_type"], "transformers": version,
            "stack": default_stack().text, "seconds": round(time.perf_counter() - t0, 1),
            "spec": cached["spec"], "regimes": cached["regimes"]}
    target_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: json.dump(data, f, sort_keys=True, separators=(",", ":")))
    if progress:
        print(f"memplan: {model_id}: {len(data['regimes'])} regimes in {data['seconds']} s -> {path}",
              file=sys.stderr, flush=True)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memplan.measure.derive_ship", description=__doc__.split("\n\n")[0])
    ap.add_argument("ids", nargs="*", help="catalog ids (default: every catalog model without a hand-written family)")
    ap.add_argument("--fresh", action="store_true", help="trace every regime again (default: keep the shipped ones "
                    "while the installed transformers derives the same spec)")
    args = ap.parse_args(argv)
    ids = args.ids or derived_catalog_ids()
    for model_id in ids:
        ship(model_id, fresh=args.fresh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
