"""Planning from training config files: every format maps to the same setup as the equivalent flags, files merge
with the later one winning, flags win over files, and bad files give one-line errors.

The JSON fixtures were written by the real libraries (``tests/fixtures/make_fixtures.py``): transformers 5.23
``TrainingArguments.to_json_string()``, peft 0.21 ``LoraConfig.save_pretrained``, ``BitsAndBytesConfig.to_dict()``
and a ``TrainingArguments`` subclass with TRL's ``SFTConfig`` fields; ``axolotl_qlora.yml`` follows axolotl's
``examples/llama-2/qlora.yml``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields as dataclass_fields
from pathlib import Path

import pytest

from tests.cli_run import run, run_json, write
from memplan.integrations.training_configs import TABLES, load_training_config, merge_configs
from memplan.errors import ConfigError, InvalidSetupError
from memplan.catalog.gpus import load_gpu
from memplan.catalog.models import load_model
from memplan.plan.setup import TrainSetup, resolve_setup

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
AXOLOTL = str(FIXTURES / "axolotl_qlora.yml")
TRAINING_ARGS = str(FIXTURES / "training_args.json")
ADAPTER = str(FIXTURES / "adapter_config.json")
BNB = str(FIXTURES / "bnb_config.json")
TRL = str(FIXTURES / "trl_sft_config.json")


# (fixture, format, argv with the config, the same setup as flags, fields the file sets)
ROUND_TRIPS = [
    pytest.param(AXOLOTL, "axolotl", ["--config", AXOLOTL],
     ["llama-2-7b", "--method", "qlora", "--bits", "4", "--rank", "32", "--alpha", "16", "--lora-dropout", "0.05",
      "--targets", "all-linear", "--seq-len", "4096", "--batch-size", "2", "--grad-ckpt",
      "--optimizer", "paged_adamw_32bit", "--attn", "flash_attention_2", "--grad-accum", "4", "--packing", "packed"],
     {"method": "qlora", "bits": 4, "rank": 32, "alpha": 16, "lora_dropout": 0.05, "targets": "all-linear",
      "seq_len": 4096, "batch_size": 2, "grad_ckpt": True, "optimizer": "paged_adamw_32bit",
      "attn": "flash_attention_2", "grad_accum": 4, "packing": "packed"}, marks=pytest.mark.extras("yaml"),
     id="axolotl"),
    (TRAINING_ARGS, "training_args", ["--model", "llama-2-7b", "--config", TRAINING_ARGS],
     ["llama-2-7b", "--batch-size", "4", "--grad-ckpt", "--autocast", "bf16", "--optimizer", "paged_adamw_8bit",
      "--grad-accum", "8"],
     {"batch_size": 4, "grad_ckpt": True, "autocast": "bf16", "optimizer": "paged_adamw_8bit", "grad_accum": 8}),
    (ADAPTER, "peft", ["--config", ADAPTER],
     ["llama-2-7b", "--rank", "16", "--alpha", "32", "--targets", "q_proj,v_proj", "--lora-dropout", "0.05"],
     {"rank": 16, "alpha": 32, "targets": "q_proj,v_proj", "lora_dropout": 0.05}),
    (BNB, "bnb", ["llama-2-7b", "--config", BNB],
     ["llama-2-7b", "--bits", "4", "--quant", "nf4", "--double-quant", "--dtype", "bf16"],
     {"bits": 4, "quant_type": "nf4", "double_quant": True, "dtype": "bf16"}),
    (TRL, "trl", ["--model", "llama-2-7b", "--config", TRL],
     ["llama-2-7b", "--batch-size", "2", "--grad-ckpt", "--dtype", "bf16", "--autocast", "bf16", "--optimizer",
      "adamw_torch", "--seq-len", "2048", "--attn", "flash_attention_2", "--grad-accum", "16", "--packing", "packed"],
     {"batch_size": 2, "grad_ckpt": True, "dtype": "bf16", "autocast": "bf16", "optimizer": "adamw_torch",
      "seq_len": 2048, "attn": "flash_attention_2", "grad_accum": 16, "packing": "packed"}),
]


@pytest.mark.parametrize("path, fmt, config_argv, flag_argv, expected", ROUND_TRIPS,
                         ids=[r.id if hasattr(r, "id") else r[1] for r in ROUND_TRIPS])
def test_each_format_matches_the_equivalent_flags(capsys, path, fmt, config_argv, flag_argv, expected):
    cfg = load_training_config(path)
    assert cfg.format == fmt
    assert cfg.fields == expected
    by_config = run_json(capsys, "estimate", *config_argv)
    by_flags = run_json(capsys, "estimate", *flag_argv)
    assert by_config["setup"] == by_flags["setup"]
    assert by_config["total_bytes"] == by_flags["total_bytes"]
    assert by_config["config"]["files"][0]["format"] == fmt
    # The file did change something: the plain default setup is a different estimate.
    assert run_json(capsys, "estimate", "llama-2-7b")["total_bytes"] != by_config["total_bytes"]


@pytest.mark.extras("yaml")
def test_models_named_in_files():
    assert load_training_config(AXOLOTL).model == "NousResearch/Llama-2-7b-hf"
    assert load_training_config(ADAPTER).model == "llama-2-7b-hf"
    assert load_training_config(TRAINING_ARGS).model is None


def test_tables_map_only_setup_fields():
    known = {f.name for f in dataclass_fields(TrainSetup)}
    for fmt, table in TABLES.items():
        for key, (field, _) in table.items():
            assert field is None or field in known, (fmt, key, field)


def test_training_args_keys_are_real_transformers_fields():
    ta = json.loads(Path(TRAINING_ARGS).read_text())
    not_ta = {"model_name_or_path", "group_by_length"}  # run-script key; transformers 4.x name
    assert set(TABLES["training_args"]) - not_ta <= set(ta)


@pytest.mark.extras("yaml")
def test_used_and_notes_are_reported(capsys):
    cfg = load_training_config(AXOLOTL)
    assert ("micro_batch_size", 2, "batch_size") in cfg.used
    assert ("lora_target_linear", True, "targets") in cfg.used
    assert {k for k, _ in cfg.ignored} == {"bf16"}
    assert ("gradient_accumulation_steps", 4, "grad_accum") in cfg.used
    assert ("sample_packing", True, "packing") in cfg.used  # packed rows (memplan.plan.seq_shapes)
    assert cfg.warnings == ()
    assert "dtype" not in cfg.fields and "autocast" not in cfg.fields  # bf16: auto: memplan's default
    code, out, _ = run(capsys, "estimate", "--config", TRAINING_ARGS, "--model", "llama-2-7b")
    assert code == 0
    assert f"from {TRAINING_ARGS}: per_device_train_batch_size=4 -> batch_size" in " ".join(out.split())


def test_flags_override_the_config(capsys):
    d = run_json(capsys, "estimate", "llama-2-7b", "--config", TRAINING_ARGS, "--batch-size", "8", "--no-grad-ckpt")
    assert (d["setup"]["batch_size"], d["setup"]["grad_ckpt"]) == (8, False)
    assert d["setup"]["optimizer"] == "paged_adamw_8bit"  # still from the file
    assert any("batch_size=8 overrides per_device_train_batch_size=4" in o for o in d["config"]["overrides"])


@pytest.mark.extras("yaml")
def test_later_file_wins_and_the_conflict_is_warned():
    ax, ad = load_training_config(AXOLOTL), load_training_config(ADAPTER)
    setup, pinned, report = merge_configs([ax, ad], {"batch_size": None})
    assert (setup.rank, setup.targets, setup.alpha) == (16, "q_proj,v_proj", 32)
    assert setup.seq_len == 4096 and setup.method == "qlora"  # only the axolotl file sets these
    assert setup.model == "llama-2-7b-hf"  # both name a model: the later one
    assert any(c.startswith(f"lora_r 32 from {AXOLOTL} overridden by 16 from {ADAPTER} (r)") for c in report.conflicts)
    assert {"rank", "targets", "seq_len", "batch_size", "method", "bits"} <= pinned and "model" not in pinned
    setup, _, _ = merge_configs([ad, ax], {})
    assert (setup.rank, setup.targets) == (32, "all-linear")


def test_two_files_through_the_cli(capsys):
    d = run_json(capsys, "estimate", "--config", ADAPTER, "--config", BNB)
    s = d["setup"]
    assert (s["rank"], s["bits"], s["quant_type"], s["targets"], s["model"]) == (16, 4, "nf4", "q_proj,v_proj",
                                                                                 "llama-2-7b-hf")
    assert [f["format"] for f in d["config"]["files"]] == ["peft", "bnb"]


@pytest.mark.extras("yaml")
@pytest.mark.parametrize("text, names", [
    ("base_model: llama-2-7b\nadapter: lora\nload_in_4bit: true\nload_in_8bit: true\n",
     ("load_in_4bit: true", "load_in_8bit: true")),
    ("base_model: llama-2-7b\nadapter: lora\nbf16: true\nfp16: true\n", ("bf16: true", "fp16: true")),
    ("base_model: llama-2-7b\nadapter: qlora\nload_in_8bit: true\n", ("adapter: qlora", "load_in_8bit: true")),
])
def test_contradictory_settings_raise(tmp_path, capsys, text, names):
    path = write(tmp_path, "c.yml", text)
    with pytest.raises(InvalidSetupError, match="contradictory") as exc:
        load_training_config(path)
    assert all(n in str(exc.value) for n in names) and path in str(exc.value)
    code, _, err = run(capsys, "estimate", "--config", path)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_contradictory_precision_in_training_args_json(tmp_path):
    ta = json.loads(Path(TRAINING_ARGS).read_text()) | {"fp16": True}
    with pytest.raises(InvalidSetupError, match=r"bf16: true and fp16: true"):
        load_training_config(write(tmp_path, "args.json", json.dumps(ta)))


@pytest.mark.extras("yaml")
def test_unknown_optimizer_names_close_matches(tmp_path):
    path = write(tmp_path, "a.yml", "base_model: llama-2-7b\nadapter: lora\noptimizer: paged_adamw_32bits\n")
    with pytest.raises(InvalidSetupError, match="did you mean: paged_adamw_32bit") as exc:
        load_training_config(path)
    assert str(exc.value).startswith(f"{path}: optimizer: unknown optimizer 'paged_adamw_32bits'")


@pytest.mark.extras("yaml")
def test_yaml_that_does_not_parse_exits_2_naming_file_and_line(tmp_path, capsys):
    path = write(tmp_path, "broken.yml", "base_model: llama-2-7b\nadapter: lora\nlora_r: [32\n")
    code, _, err = run(capsys, "estimate", "--config", path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and "invalid YAML at line 4" in lines[0]
    assert "Traceback" not in err


def test_json_that_does_not_parse(tmp_path):
    path = write(tmp_path, "args.json", '{"per_device_train_batch_size": 4,\n "optim": }')
    with pytest.raises(ConfigError, match=r"args.json: invalid JSON at line 2"):
        load_training_config(path)


@pytest.mark.extras("yaml")
def test_missing_file_and_unknown_formats(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_training_config(tmp_path / "nope.yml")
    with pytest.raises(ConfigError, match="not a training config memplan recognises.*axolotl YAML"):
        load_training_config(write(tmp_path, "x.json", '{"foo": 1}'))
    with pytest.raises(ConfigError, match="a model config.json .*pass it as MODEL"):
        load_training_config(write(tmp_path, "config.json", '{"model_type": "llama", "hidden_size": 64}'))
    with pytest.raises(ConfigError, match="peft_type 'PREFIX_TUNING' is not modelled"):
        load_training_config(write(tmp_path, "adapter_config.json", '{"peft_type": "PREFIX_TUNING"}'))
    with pytest.raises(ConfigError, match="top level"):
        load_training_config(write(tmp_path, "list.yml", "- a\n- b\n"))


@pytest.mark.extras("yaml")
def test_important_ignored_fields_are_warned(tmp_path, capsys):
    path = write(tmp_path, "ds.yml", "base_model: llama-2-7b\nadapter: lora\nlora_r: 16\ndeepspeed: zero3.json\n"
                                     "lora_modules_to_save:\n  - embed_tokens\n  - lm_head\ntorch_compile: true\n")
    cfg = load_training_config(path)
    assert {k for k, _ in cfg.ignored} == {"deepspeed", "torch_compile"}
    assert cfg.fields["modules_to_save"] == "embed_tokens,lm_head"  # modelled (memplan.plan.adapters)
    assert any(w.startswith("deepspeed=zero3.json: DeepSpeed") for w in cfg.warnings)
    adapter = json.loads(Path(ADAPTER).read_text()) | {"layers_to_transform": [0, 1]}
    assert [k for k, _ in load_training_config(write(tmp_path, "adapter_config.json", json.dumps(adapter))).ignored] \
        == ["layers_to_transform"]
    code, out, _ = run(capsys, "estimate", "--config", path)
    assert code == 0
    assert f"warning: {path}: deepspeed=zero3.json" in " ".join(out.split())
    d = run_json(capsys, "estimate", "--config", path)
    assert {i["key"] for i in d["config"]["files"][0]["ignored"]} == {"deepspeed", "torch_compile"}


@pytest.mark.extras("yaml")
def test_axolotl_details(tmp_path):
    full = load_training_config(write(tmp_path, "full.yml", "base_model: llama-2-7b\nmicro_batch_size: 1\n"))
    assert full.fields["method"] == "full"  # no adapter: axolotl trains every parameter
    typo = load_training_config(write(tmp_path, "t.yml", "base_model: x\nadapter: lora\nmicro_batchsize: 4\n"
                                                         "eval_sample_packing: true\n"))
    assert typo.warnings == ("micro_batchsize: not a key memplan reads (did you mean micro_batch_size?)",)
    both = load_training_config(write(tmp_path, "b.yml", "base_model: x\nadapter: lora\nlora_target_linear: true\n"
                                                         "lora_target_modules: [q_proj, v_proj]\n"))
    assert both.fields["targets"] == "all-linear" and any("using lora_target_linear" in w for w in both.warnings)


@pytest.mark.extras("yaml")
def test_trl_names_old_and_new(tmp_path):
    old = load_training_config(write(tmp_path, "old.json", json.dumps(
        {"output_dir": "o", "per_device_train_batch_size": 1, "max_seq_length": 1024, "packing": False})))
    assert old.format == "trl" and old.fields["seq_len"] == 1024
    both = load_training_config(write(tmp_path, "both.json", json.dumps(
        {"output_dir": "o", "max_seq_length": 1024, "max_length": 2048})))
    assert both.fields["seq_len"] == 2048 and "using max_length" in both.warnings[0]
    recipe = load_training_config(write(tmp_path, "recipe.yaml", "model_name_or_path: mistralai/Mistral-7B-v0.1\n"
                                        "torch_dtype: bfloat16\nuse_peft: true\nlora_r: 16\nload_in_4bit: true\n"
                                        "use_bnb_nested_quant: true\nlora_target_modules: all-linear\n"
                                        "per_device_train_batch_size: 4\nmax_length: 1024\n"))
    assert recipe.format == "trl" and recipe.model == "mistralai/Mistral-7B-v0.1"
    assert recipe.fields == {"batch_size": 4, "seq_len": 1024, "dtype": "bf16", "rank": 16, "targets": "all-linear",
                             "bits": 4, "double_quant": True}


def test_peft_adapter_folder(tmp_path):
    (tmp_path / "adapter_config.json").write_text(Path(ADAPTER).read_text())
    assert load_training_config(tmp_path).fields["rank"] == 16


@pytest.mark.extras("yaml")
def test_free_lets_fit_change_the_batch_only(capsys):
    pinned = run_json(capsys, "fit", "--config", AXOLOTL, "--gpu", "a100-80g")["recommended"]["setup"]
    freed = run_json(capsys, "fit", "--config", AXOLOTL, "--gpu", "a100-80g", "--free", "batch_size")
    s = freed["recommended"]["setup"]
    assert pinned["batch_size"] == 2 and s["batch_size"] > 2
    for field in ("bits", "method", "rank", "targets", "grad_ckpt", "optimizer", "seq_len", "attn", "dtype"):
        assert s[field] == pinned[field], field
    assert (s["rank"], s["optimizer"], s["seq_len"]) == (32, "paged_adamw_32bit", 4096)
    spelled = run_json(capsys, "fit", "--config", AXOLOTL, "--gpu", "a100-80g", "--free", "batch-size")
    assert spelled["recommended"]["setup"] == s


@pytest.mark.parametrize("argv, expected", [
    (["estimate"], "no model given"),
    (["estimate", "--config", TRAINING_ARGS], "none of"),
    (["fit", "--gpu", "3090", "--config", BNB], "no model given"),
    (["fit", "opt-13b", "--gpu", "3090", "--free", "batch_sz"], "allowed: method, bits"),
    (["fit", "opt-13b", "--gpu", "3090", "--free", "rank", "--rank", "8"], "contradicts"),
])
def test_one_line_errors(capsys, argv, expected):
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err


def test_yaml_without_pyyaml_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ConfigError, match=r"pip install 'memplan\[yaml\]'"):
        load_training_config(AXOLOTL)


# ---- precision: what runs under autocast (issue 13) ----------------------------------------------------------

def test_bf16_and_fp16_flags_are_autocast_not_the_weights_dtype(tmp_path):
    """TrainingArguments(bf16=True) runs forward and loss under torch.autocast; the weights keep the dtype they
    were loaded in (transformers/training_args.py, accelerate's mixed_precision)."""
    ta = load_training_config(write(tmp_path, "ta.json", json.dumps(
        {"output_dir": "o", "per_device_train_batch_size": 2, "fp16": True})))
    assert ta.fields == {"batch_size": 2, "autocast": "fp16"}
    spec = load_model("llama-2-7b")
    resolved = resolve_setup(TrainSetup("llama-2-7b", **ta.fields), spec, load_gpu("3090"))
    assert (resolved.dtype, resolved.autocast) == ("fp16", "fp16")  # the weights follow unless a file says


def test_accelerate_config_gives_the_autocast_and_warns_about_what_it_does_not_model(tmp_path):
    cfg = load_training_config(write(tmp_path, "default_config.json", json.dumps(
        {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "mixed_precision": "bf16",
         "num_processes": 2, "machine_rank": 0})))
    # (the GPUs and the engine: tests/integrations/test_config_distributed.py)
    assert cfg.format == "accelerate" and cfg.fields == {"autocast": "bf16", "gpus": 2, "strategy": "ddp"}
    assert cfg.warnings == ()
    off = load_training_config(write(tmp_path, "no.json", json.dumps(
        {"compute_environment": "LOCAL_MACHINE", "mixed_precision": "no"})))
    assert off.fields == {"autocast": "off"}
    fsdp = load_training_config(write(tmp_path, "fsdp.json", json.dumps(
        {"distributed_type": "FSDP", "mixed_precision": "fp8"})))
    assert "autocast" not in fsdp.fields and fsdp.fields["strategy"] == "fsdp" and len(fsdp.warnings) == 1
    with pytest.raises(InvalidSetupError, match="unknown mixed_precision 'int4'; allowed: no, fp16, bf16, fp8"):
        load_training_config(write(tmp_path, "bad.json", json.dumps(
            {"compute_environment": "LOCAL_MACHINE", "mixed_precision": "int4"})))


@pytest.mark.extras("yaml")
def test_axolotl_bfloat16_is_pure_bf16_without_autocast(tmp_path):
    pure = load_training_config(write(tmp_path, "pure.yml", "base_model: llama-2-7b\nadapter: lora\nbfloat16: true\n"))
    assert pure.fields["dtype"] == "bf16" and pure.fields["autocast"] == "off"
    amp = load_training_config(write(tmp_path, "amp.yml", "base_model: llama-2-7b\nadapter: lora\nbf16: true\n"))
    assert amp.fields["autocast"] == "bf16" and "dtype" not in amp.fields


def test_feature_keys_map_to_their_knobs():
    """The keys that switch on adapter variants, initialisations, savers and packing set their setup fields."""
    from memplan.integrations.training_configs import map_training_config

    peft = map_training_config({"peft_type": "LORA", "r": 16, "use_dora": True, "use_rslora": True,
                                "modules_to_save": ["lm_head", "embed_tokens"], "init_lora_weights": "pissa_niter_4",
                                "trainable_token_indices": {"embed_tokens": [1, 2, 2, 3]}}, "peft", source="a.json")
    assert peft.fields == {"rank": 16, "adapter": "dora", "rslora": True, "modules_to_save": "lm_head,embed_tokens",
                           "init": "pissa_niter_4", "trainable_tokens": 3}
    ia3 = map_training_config({"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                               "feedforward_modules": ["down_proj"]}, "peft", source="a.json")
    assert ia3.fields == {"adapter": "ia3", "targets": "k_proj,v_proj,down_proj"}
    trl = map_training_config({"output_dir": "o", "max_length": 1024, "packing": True, "padding_free": True,
                               "use_liger_kernel": True, "activation_offloading": True}, "trl", source="s.json")
    assert trl.fields == {"seq_len": 1024, "packing": "packed", "loss": "liger", "activation_offload": "pinned"}
    free = map_training_config({"output_dir": "o", "padding_free": True}, "trl", source="s.json")
    assert free.fields["packing"] == "padding-free"
    ax = map_training_config({"base_model": "m", "adapter": "lora", "peft_use_dora": True, "sample_packing": True,
                              "plugins": ["axolotl.integrations.liger.LigerPlugin"],
                              "liger_fused_linear_cross_entropy": True, "lora_modules_to_save": ["lm_head"]},
                             "axolotl", source="a.yml")
    assert {k: ax.fields[k] for k in ("adapter", "packing", "loss", "modules_to_save")} == {
        "adapter": "dora", "packing": "packed", "loss": "liger", "modules_to_save": "lm_head"}
    with pytest.raises(ConfigError, match="peft_type"):
        map_training_config({"peft_type": "PREFIX_TUNING"}, "peft", source="a.json")
    wrapped = map_training_config({"output_dir": "o", "packing": True, "packing_strategy": "wrapped"}, "trl",
                                  source="s.json")
    assert "packing" not in wrapped.fields  # TRL's wrapped packing: plain full rows
