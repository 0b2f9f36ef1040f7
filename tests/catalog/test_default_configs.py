"""Where a transformers configuration class's defaults build a catalog checkpoint, the entry says so
(``transformers_default`` in ``profiles/models/<id>.json``) and this test holds it: the spec memplan builds from
``AutoConfig.for_model(model_type)`` equals the entry's spec in every field but those ``differs`` lists (with the
values it records), and the class docstring names the checkpoint recorded as ``docstring_checkpoint``.
Skipped without transformers."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import pytest

from memplan.catalog.models import list_models, load_model, spec_from_config

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
CATALOG = list_models(profiles_dir=PROFILES) if (PROFILES / "models").is_dir() else []
WITH_DEFAULT = [m for m in CATALOG if "transformers_default" in json.loads(m.path.read_text())]

# Fields that name the model rather than describe it.
_IDENTITY = {"name", "hf_id", "source", "config", "derived_key"}


def test_entries_that_say_so_exist():
    if CATALOG:
        # llama-2-7b-hf, mistral-7b-v0.1, mixtral-8x7b-v0.1, phi-3-mini, falcon-7b, gpt2, stablelm-3b-4e1t,
        # gemma-2-2b, opt-125m, phi-1_5 (transformers 5.24)
        assert len(WITH_DEFAULT) >= 10


@pytest.mark.parametrize("entry", WITH_DEFAULT, ids=[m.id for m in WITH_DEFAULT])
def test_default_config_builds_the_checkpoint(entry):
    transformers = pytest.importorskip("transformers")
    recorded = json.loads(entry.path.read_text())["transformers_default"]
    mt = recorded["model_type"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = transformers.AutoConfig.for_model(mt)
    doc_refs = re.findall(r"\[([\w\-.]+/[\w\-.]+)\]\(https://huggingface\.co", type(default).__doc__ or "")
    assert doc_refs[:1] == [recorded["docstring_checkpoint"]]
    spec = spec_from_config({**default.to_dict(), "model_type": mt}, name=entry.id)
    catalog_spec = load_model(entry.id, profiles_dir=PROFILES)
    differs = {f.name: {"default": getattr(spec, f.name), "checkpoint": getattr(catalog_spec, f.name)}
               for f in dataclasses.fields(spec)
               if f.name not in _IDENTITY and getattr(spec, f.name) != getattr(catalog_spec, f.name)}
    assert differs == recorded["differs"]
    assert spec.total_params() == entry.exact_params
