"""Multi-GPU settings from training configs (memplan.integrations.config_distributed): accelerate config YAML, a
DeepSpeed config JSON, the fsdp / fsdp_config / deepspeed keys of TrainingArguments, TRL's SFTConfig and axolotl
map onto gpus / nodes / strategy / fsdp_sharding / offload, with every key in ``used``, what is not modelled in
``ignored``, and one-line errors naming the key, the value and what is allowed.

``accelerate_fsdp.yaml`` is ``accelerate config`` output (accelerate 1.15, FSDP2, 4 GPUs); ``ds_zero3_offload.json``
is the ZeRO-3 CPU-offload config of the transformers DeepSpeed docs, every Trainer-filled value "auto".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.cli_run import run, run_json, write
from memplan.errors import ConfigError, InvalidSetupError
from memplan.integrations.preflight import setup_fields_from_training_args
from memplan.integrations.training_configs import TABLES, load_training_config, map_training_config, merge_configs

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ACCEL_FSDP = str(FIXTURES / "accelerate_fsdp.yaml")
DS_ZERO3 = str(FIXTURES / "ds_zero3_offload.json")
TRAINING_ARGS = str(FIXTURES / "training_args.json")
TA = {"output_dir": "o", "per_device_train_batch_size": 4}  # the least a TrainingArguments JSON has
ACCEL = "compute_environment: LOCAL_MACHINE\nmixed_precision: bf16\n"
ACCEL_JSON = {"compute_environment": "LOCAL_MACHINE", "mixed_precision": "bf16"}  # (accelerate reads JSON too)


def dist(cfg) -> dict:
    return {k: v for k, v in cfg.fields.items() if k in ("gpus", "nodes", "strategy", "fsdp_sharding", "offload")}


# ---- accelerate config YAML ------------------------------------------------------------------------------------

@pytest.mark.extras("yaml")
def test_accelerate_fsdp2_fixture():
    cfg = load_training_config(ACCEL_FSDP)
    assert cfg.format == "accelerate"
    assert cfg.fields == {"autocast": "bf16", "gpus": 4, "nodes": 1, "strategy": "fsdp2", "fsdp_sharding": "full"}
    assert ("num_processes", 4, "gpus") in cfg.used and ("distributed_type", "FSDP", "strategy") in cfg.used
    assert ("fsdp_config.fsdp_version", 2, "strategy") in cfg.used
    assert ("fsdp_config.fsdp_reshard_after_forward", True, "fsdp_sharding") in cfg.used
    assert cfg.warnings == () and cfg.ignored == ()


@pytest.mark.extras("yaml")
def test_accelerate_fsdp_through_the_cli_matches_the_flags(capsys):
    by_config = run_json(capsys, "estimate", "llama-2-7b-hf", "--config", ACCEL_FSDP)
    s = by_config["setup"]
    assert (s["gpus"], s["nodes"], s["strategy"], s["fsdp_sharding"], s["offload"]) == (4, 1, "fsdp2", "full", "none")
    by_flags = run_json(capsys, "estimate", "llama-2-7b-hf", "--gpus", "4", "--strategy", "fsdp2",
                        "--fsdp-sharding", "full", "--autocast", "bf16")
    assert by_config["setup"] == by_flags["setup"] and by_config["total_bytes"] == by_flags["total_bytes"]
    assert run_json(capsys, "estimate", "llama-2-7b-hf")["total_bytes"] != by_config["total_bytes"]


@pytest.mark.extras("yaml")
def test_accelerate_deepspeed_file_through_the_cli(tmp_path, monkeypatch, capsys):
    """deepspeed_config_file is read beside the YAML (not the working directory), and its ZeRO-3 offload shows."""
    (tmp_path / "ds").mkdir()
    shutil.copy(DS_ZERO3, tmp_path / "ds" / "z3.json")
    accel = write(tmp_path, "accel.yaml", ACCEL + "distributed_type: DEEPSPEED\nnum_machines: 2\nnum_processes: 16\n"
                                                  "deepspeed_config:\n  deepspeed_config_file: ds/z3.json\n")
    monkeypatch.chdir(tmp_path / "ds")  # a working directory where ds/z3.json is not
    d = run_json(capsys, "estimate", "llama-2-7b-hf", "--config", accel)
    s = d["setup"]
    assert (s["gpus"], s["nodes"], s["strategy"], s["offload"]) == (8, 2, "zero3", "params")
    used = {(u["key"], u["field"]) for u in d["config"]["files"][0]["used"]}
    assert {("num_processes", "gpus"), ("num_machines", "nodes"), ("distributed_type", "strategy"),
            ("z3.json:zero_optimization.stage", "strategy"), ("z3.json:zero_optimization.offload_param.device",
                                                              "offload")} <= used
    assert any(n.endswith(f"read {tmp_path / 'ds' / 'z3.json'}") for n in d["config"]["files"][0]["notes"])


@pytest.mark.extras("yaml")
@pytest.mark.parametrize("text, expected, says", [
    ("distributed_type: MULTI_GPU\nnum_processes: 8\nnum_machines: 2\n",
     {"gpus": 4, "nodes": 2, "strategy": "ddp"}, None),
    ("distributed_type: 'NO'\nnum_processes: 1\n", {"gpus": 1, "strategy": "single"}, None),
    ("distributed_type: NO\nnum_processes: 2\n", {"gpus": 2, "strategy": "ddp"}, "launches them data-parallel"),
    ("distributed_type: FSDP\nnum_processes: 2\n", {"gpus": 2, "strategy": "fsdp"}, None),  # FSDP1: the default
    ("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_sharding_strategy: SHARD_GRAD_OP\n",
     {"gpus": 2, "strategy": "fsdp", "fsdp_sharding": "grad-op"}, None),
    ("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_sharding_strategy: 2\n",  # older accelerate
     {"gpus": 2, "strategy": "fsdp", "fsdp_sharding": "grad-op"}, None),
    ("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_reshard_after_forward: FULL_SHARD\n"
     "  fsdp_version: 1\n  fsdp_offload_params: true\n", {"gpus": 2, "strategy": "fsdp", "fsdp_sharding": "full",
                                                          "offload": "params"}, None),
    ("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_sharding_strategy: NO_SHARD\n",
     {"gpus": 2, "strategy": "ddp"}, "planned as ddp"),
    ("distributed_type: FSDP\nnum_processes: 4\nfsdp_config:\n  fsdp_sharding_strategy: 4\n",
     {"gpus": 4, "strategy": "fsdp", "fsdp_sharding": "full"}, "hybrid sharding on one machine"),
    ("distributed_type: FSDP\nnum_processes: 8\nnum_machines: 2\nfsdp_config:\n  fsdp_sharding_strategy: "
     "HYBRID_SHARD\n", {"gpus": 4, "nodes": 2, "strategy": "fsdp", "fsdp_sharding": "hybrid"}, None),
    ("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_version: 2\n  fsdp_reshard_after_forward: "
     "false\n", {"gpus": 2, "strategy": "fsdp2", "fsdp_sharding": "grad-op"}, None),
    ("distributed_type: DEEPSPEED\nnum_processes: 4\ndeepspeed_config:\n  zero_stage: 3\n  offload_optimizer_device:"
     " cpu\n  offload_param_device: cpu\n", {"gpus": 4, "strategy": "zero3", "offload": "params"}, None),
    ("distributed_type: DEEPSPEED\nnum_processes: 4\ndeepspeed_config:\n  zero_stage: 1\n  offload_optimizer_device:"
     " nvme\n", {"gpus": 4, "strategy": "zero1", "offload": "optimizer"}, "NVMe is not modelled apart"),
    ("distributed_type: DEEPSPEED\nnum_processes: 4\n", {"gpus": 4, "strategy": "zero2"}, "accelerate's default"),
    ("distributed_type: DEEPSPEED\nnum_processes: 4\ndeepspeed_config:\n  zero_stage: 0\n",
     {"gpus": 4, "strategy": "ddp"}, "stage 0"),
    ("distributed_type: MULTI_GPU\nnum_processes: -1\n", {"strategy": "ddp"}, None),  # -1: given at launch
])
def test_accelerate_settings(tmp_path, text, expected, says):
    cfg = load_training_config(write(tmp_path, "accel.yaml", ACCEL + text))
    assert dist(cfg) == expected
    assert cfg.warnings == ()
    if says:
        assert any(says in n for n in cfg.notes), cfg.notes


@pytest.mark.extras("yaml")
def test_accelerate_what_is_not_modelled_is_warned(tmp_path):
    zero2 = load_training_config(write(tmp_path, "a.yaml", ACCEL + "distributed_type: FSDP\nnum_processes: 8\n"
                                       "num_machines: 2\nfsdp_config:\n  fsdp_sharding_strategy: HYBRID_SHARD_ZERO2\n"
                                       "  fsdp_activation_checkpointing: true\n  fsdp_auto_wrap_policy: NO_WRAP\n"))
    assert dist(zero2) == {"gpus": 4, "nodes": 2, "strategy": "fsdp", "fsdp_sharding": "hybrid"}
    assert zero2.fields["grad_ckpt"] is True  # FSDP's activation checkpointing is checkpointing
    assert {k for k, _ in zero2.ignored} == {"fsdp_config.fsdp_sharding_strategy", "fsdp_config.fsdp_auto_wrap_policy"}
    cpu = load_training_config(write(tmp_path, "c.yaml", ACCEL + "distributed_type: MULTI_CPU\nnum_processes: 4\n"))
    assert "strategy" not in cpu.fields and "training on CPU processes is not modelled" in cpu.warnings[0]
    missing = load_training_config(write(tmp_path, "m.yaml", ACCEL + "distributed_type: DEEPSPEED\nnum_processes: 2\n"
                                         "deepspeed_config:\n  deepspeed_config_file: nowhere.json\n"))
    assert dist(missing) == {"gpus": 2} and [k for k, _ in missing.ignored] == \
        ["deepspeed_config.deepspeed_config_file"]
    assert "DeepSpeed config file not found" in missing.warnings[0]


# ---- DeepSpeed config JSON -----------------------------------------------------------------------------------

def test_deepspeed_zero3_offload_fixture():
    cfg = load_training_config(DS_ZERO3)
    assert cfg.format == "deepspeed"
    assert cfg.fields == {"strategy": "zero3", "offload": "params", "optimizer": "adamw_torch"}  # no GPU count
    assert [(k, f) for k, _, f in cfg.used] == [
        ("zero_optimization.stage", "strategy"), ("zero_optimization.offload_optimizer.device", "offload"),
        ("zero_optimization.offload_param.device", "offload"), ("optimizer.type", "optimizer")]
    assert cfg.warnings == () and cfg.ignored == ()  # every number it sets is "auto" or DeepSpeed's default
    assert any("does not say how many GPUs" in n for n in cfg.notes)


def test_deepspeed_json_values(tmp_path):
    ds = load_training_config(write(tmp_path, "ds.json", {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 8, "train_batch_size": 64,
        "bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"},
                                                         "reduce_bucket_size": 5e8, "allgather_bucket_size": 2e8,
                                                         "stage3_prefetch_bucket_size": "auto"}}))
    assert ds.fields == {"strategy": "zero2", "offload": "optimizer", "batch_size": 2, "grad_accum": 8,
                         "autocast": "bf16"}
    assert ("bf16.enabled", True, "autocast") in ds.used
    assert ("train_micro_batch_size_per_gpu", 2, "batch_size") in ds.used
    ignored = dict(ds.ignored)
    assert set(ignored) == {"zero_optimization.reduce_bucket_size", "zero_optimization.allgather_bucket_size",
                            "train_batch_size"}
    assert ignored["zero_optimization.reduce_bucket_size"].startswith("memplan plans the Trainer's auto values "
                                                                       "(reduce_bucket_size = hidden^2")
    assert "x 4 GPUs" in ignored["train_batch_size"]  # 64 = 2 x 8 x 4
    off = load_training_config(write(tmp_path, "fp32.json", {"train_micro_batch_size_per_gpu": "auto",
                                                            "bf16": {"enabled": False}, "fp16": {"enabled": False}}))
    assert off.fields == {"strategy": "ddp", "autocast": "off"}  # no zero_optimization: DeepSpeed's stage 0
    assert any("DeepSpeed's default, stage 0" in n for n in off.notes)


@pytest.mark.parametrize("zero, expected, warned", [
    ({"stage": 2, "offload_param": {"device": "cpu"}}, {"strategy": "zero2"}, "ZeRO-3 only"),
    ({"stage": 0, "offload_optimizer": {"device": "cpu"}}, {"strategy": "ddp"}, "stages 1-3"),
    ({"stage": 3, "offload_param": {"device": "nvme"}}, {"strategy": "zero3", "offload": "params"},
     "without offload_optimizer"),
    ({"stage": 2, "cpu_offload": True}, {"strategy": "zero2", "offload": "optimizer"}, None),  # deprecated name
    ({"stage": "3", "zero_hpz_partition_size": 8}, {"strategy": "zero3"}, "ZeRO++"),
])
def test_deepspeed_offload_rules(tmp_path, zero, expected, warned):
    cfg = load_training_config(write(tmp_path, "ds.json", {"zero_optimization": zero}))
    assert dist(cfg) == expected
    assert (warned is None and cfg.warnings == ()) or any(warned in w for w in cfg.warnings), cfg.warnings


def test_deepspeed_optimizer_other_than_adam_is_warned(tmp_path):
    cfg = load_training_config(write(tmp_path, "ds.json", {"zero_optimization": {"stage": 1},
                                                           "optimizer": {"type": "Lamb"}}))
    assert "optimizer" not in cfg.fields and [k for k, _ in cfg.ignored] == ["optimizer.type"]


# ---- TrainingArguments / SFTConfig / axolotl -----------------------------------------------------------------

@pytest.mark.parametrize("keys, expected", [
    ({"fsdp": "full_shard auto_wrap"}, {"strategy": "fsdp", "fsdp_sharding": "full"}),
    ({"fsdp": ["shard_grad_op", "auto_wrap", "offload"]}, {"strategy": "fsdp", "fsdp_sharding": "grad-op",
                                                          "offload": "params"}),
    ({"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}}, {"strategy": "fsdp2", "fsdp_sharding": "full"}),
    ({"fsdp": "full_shard", "fsdp_config": {"version": 2, "reshard_after_forward": False}},
     {"strategy": "fsdp2", "fsdp_sharding": "grad-op"}),
    ({"fsdp": "hybrid_shard"}, {"strategy": "fsdp", "fsdp_sharding": "hybrid"}),
    # transformers 5 writes fsdp=True and moves the options into fsdp_config (its default: FSDP2)
    ({"fsdp": True, "fsdp_config": {"reshard_after_forward": True, "cpu_offload": True, "min_num_params": 0,
                                    "xla": False}},
     {"strategy": "fsdp2", "fsdp_sharding": "full", "offload": "params"}),
    # transformers 4.x: fsdp off is [] next to a default fsdp_config
    ({"fsdp": [], "fsdp_config": {"min_num_params": 0, "xla": False}, "deepspeed": None}, {}),
    ({"deepspeed": {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}},
     {"strategy": "zero3"}),
])
def test_training_args_fsdp_and_deepspeed(keys, expected):
    cfg = map_training_config(TA | keys, "training_args", source="args.json")
    assert dist(cfg) == expected
    assert cfg.fields["batch_size"] == 4
    if expected:
        assert any("does not say how many GPUs" in n for n in cfg.notes)
    if isinstance(keys.get("fsdp"), str) and "version" not in str(keys.get("fsdp_config")):
        assert any("planned as FSDP1" in n for n in cfg.notes)  # the transformers 4.x reading, said


def test_training_args_deepspeed_path_is_read_beside_the_file(tmp_path, monkeypatch, capsys):
    shutil.copy(DS_ZERO3, tmp_path / "zero3.json")
    args = write(tmp_path, "args.json", json.loads(Path(TRAINING_ARGS).read_text()) | {"deepspeed": "zero3.json"})
    monkeypatch.chdir(FIXTURES.parent)
    cfg = load_training_config(args)
    assert cfg.format == "training_args"
    assert dist(cfg) == {"strategy": "zero3", "offload": "params"}
    assert ("zero3.json:zero_optimization.stage", 3, "strategy") in cfg.used
    # the Trainer runs DeepSpeed's AdamW, not optim: said, and the optim key no longer listed as used
    assert cfg.fields["optimizer"] == "adamw_torch" and "optim" not in {k for k, _, _ in cfg.used}
    assert any("not optim=paged_adamw_8bit" in n for n in cfg.notes)
    d = run_json(capsys, "estimate", "--model", "llama-2-7b-hf", "--config", args, "--gpus", "4")
    assert (d["setup"]["gpus"], d["setup"]["strategy"], d["setup"]["offload"]) == (4, "zero3", "params")


def test_the_plain_training_args_fixture_sets_no_engine():
    assert dist(load_training_config(TRAINING_ARGS)) == {}


def test_trl_sft_config_reads_the_same_keys(tmp_path):
    cfg = load_training_config(write(tmp_path, "sft.json", {**TA, "max_length": 2048, "packing": True,
                                                            "fsdp": "full_shard auto_wrap offload",
                                                            "fsdp_config": {"activation_checkpointing": True}}))
    assert cfg.format == "trl"
    assert dist(cfg) == {"strategy": "fsdp", "fsdp_sharding": "full", "offload": "params"}
    assert cfg.fields["grad_ckpt"] is True and cfg.fields["seq_len"] == 2048


@pytest.mark.extras("yaml")
def test_axolotl_deepspeed_and_fsdp(tmp_path):
    (tmp_path / "deepspeed_configs").mkdir()
    write(tmp_path, "deepspeed_configs/zero2.json", {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"},
                                                     "train_micro_batch_size_per_gpu": "auto"})
    base = "base_model: llama-2-7b\nadapter: qlora\nload_in_4bit: true\nmicro_batch_size: 2\n"
    ds = load_training_config(write(tmp_path, "ds.yml", base + "deepspeed: deepspeed_configs/zero2.json\n"))
    assert dist(ds) == {"strategy": "zero2"} and ds.fields["batch_size"] == 2
    old = load_training_config(write(tmp_path, "f1.yml", base + "fsdp:\n  - full_shard\n  - auto_wrap\nfsdp_config:\n"
                                     "  fsdp_offload_params: true\n  fsdp_transformer_layer_cls_to_wrap: "
                                     "LlamaDecoderLayer\n"))
    assert dist(old) == {"strategy": "fsdp", "fsdp_sharding": "full", "offload": "params"}
    new = load_training_config(write(tmp_path, "f2.yml", base + "fsdp_version: 2\nfsdp_config:\n  offload_params: "
                                     "false\n  sharding_strategy: FULL_SHARD\n  reshard_after_forward: true\n"
                                     "  activation_checkpointing: true\n"))
    assert dist(new) == {"strategy": "fsdp2", "fsdp_sharding": "full"} and new.fields["grad_ckpt"] is True
    assert ("fsdp_version", 2, "strategy") in new.used and new.warnings == ()


def test_merging_the_launcher_and_the_trainer_configs(tmp_path):
    """accelerate says how many GPUs, the Trainer's DeepSpeed config which engine: merged, one rank's setup."""
    accel = map_training_config({"distributed_type": "MULTI_GPU", "num_processes": 8, "num_machines": 1},
                                "accelerate", source="accel.yaml")
    args = map_training_config(TA | {"deepspeed": {"zero_optimization": {"stage": 3}}}, "training_args",
                               source="args.json")
    setup, pinned, report = merge_configs([accel, args], {}, model="llama-2-7b-hf")
    assert (setup.gpus, setup.nodes, setup.strategy) == (8, 1, "zero3")
    assert {"gpus", "nodes", "strategy"} <= pinned
    assert report.conflicts == ("distributed_type ddp from accel.yaml overridden by zero3 from args.json "
                                "(deepspeed.zero_optimization.stage)",)


def test_preflight_reads_a_transformers_5_training_args_dict():
    fields = setup_fields_from_training_args(TA | {"fsdp": True, "fsdp_config": {"reshard_after_forward": False}})
    assert (fields["strategy"], fields["fsdp_sharding"]) == ("fsdp2", "grad-op")


def test_every_table_lists_the_keys_config_distributed_reads():
    for fmt, keys in (("training_args", ("fsdp", "fsdp_config", "deepspeed")), ("trl", ("fsdp", "deepspeed")),
                      ("axolotl", ("fsdp", "fsdp_config", "fsdp_version", "deepspeed")),
                      ("accelerate", ("distributed_type", "num_processes", "num_machines", "fsdp_config",
                                      "deepspeed_config")), ("deepspeed", ("zero_optimization",))):
        assert set(keys) <= set(TABLES[fmt]), fmt


# ---- bad values: one line naming the key, the value and what is allowed ----------------------------------------

@pytest.mark.parametrize("name, content, expected", [
    ("a.json", ACCEL_JSON | {"distributed_type": "FDSP"}, "distributed_type: unknown distributed_type 'FDSP' "
     "(did you mean: FSDP?); allowed: NO, MULTI_GPU"),
    ("a.json", ACCEL_JSON | {"distributed_type": "FSDP", "fsdp_config": {"fsdp_sharding_strategy": "FULL_SHARDD"}},
     "fsdp_config.fsdp_sharding_strategy: unknown FSDP sharding 'FULL_SHARDD' (did you mean: FULL_SHARD"),
    ("a.json", ACCEL_JSON | {"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 3}},
     "fsdp_config.fsdp_version: unknown FSDP version 3; allowed: 1, 2"),
    ("a.json", ACCEL_JSON | {"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2,
                                                                         "fsdp_reshard_after_forward": "HYBRID_SHARD"}},
     "fsdp_config.fsdp_reshard_after_forward: HYBRID_SHARD is an FSDP1 sharding"),
    ("a.json", ACCEL_JSON | {"distributed_type": "MULTI_GPU", "num_processes": 6, "num_machines": 4},
     "num_processes 6 is not a multiple of num_machines 4"),
    ("a.json", ACCEL_JSON | {"distributed_type": "MULTI_GPU", "num_processes": "two"},
     "num_processes: expected an integer >= 1, got 'two'"),
    ("a.json", ACCEL_JSON | {"distributed_type": "DEEPSPEED", "deepspeed_config": {
        "zero_stage": 3, "offload_param_device": "disk"}},
     "deepspeed_config.offload_param_device: unknown offload device 'disk'; allowed: none, cpu, nvme"),
    ("a.json", ACCEL_JSON | {"distributed_type": "FSDP", "fsdp_config": {"fsdp_offload_params": "maybe"}},
     "fsdp_config.fsdp_offload_params: expected true or false, got 'maybe'"),
    ("ds.json", {"zero_optimization": {"stage": 4}}, "zero_optimization.stage: unknown ZeRO stage 4; allowed: 0, 1"),
    ("ds.json", {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "CPUU"}}},
     "zero_optimization.offload_optimizer.device: unknown offload device 'CPUU' (did you mean: cpu?)"),
    ("ds.json", {"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu: expected an integer >= 1"),
    ("ds.json", {"zero_optimization": {}, "bf16": {"enabled": True}, "fp16": {"enabled": True}},
     "contradictory settings bf16.enabled: true and fp16.enabled: true"),
    ("args.json", TA | {"fsdp": "full_shard auto_wrapp"}, "fsdp: unknown fsdp option 'auto_wrapp' (did you mean: "
     "auto_wrap?); allowed: full_shard"),
    ("args.json", TA | {"fsdp": "hybrid_shard", "fsdp_config": {"version": 2}}, "fsdp: hybrid_shard is an FSDP1"),
    ("args.json", TA | {"deepspeed": {"train_micro_batch_size_per_gpu": 8}}, "contradictory settings "
     "per_device_train_batch_size: 4 and deepspeed.train_micro_batch_size_per_gpu: 8 (the Trainer refuses"),
    ("args.json", TA | {"fp16": True, "deepspeed": {"bf16": {"enabled": True}}}, "contradictory settings fp16: true "
     "and deepspeed.bf16.enabled: true"),
    ("args.json", TA | {"deepspeed": "ds.json", "fsdp": "full_shard"}, "contradictory settings deepspeed: ds.json "
     "and fsdp: full_shard; keep one"),
])
def test_bad_values_are_one_line_errors(tmp_path, capsys, name, content, expected):
    path = write(tmp_path, name, content)
    with pytest.raises(InvalidSetupError) as exc:
        load_training_config(path)
    assert str(exc.value).startswith(f"{path}: ") and expected in str(exc.value), str(exc.value)
    code, _, err = run(capsys, "estimate", "llama-2-7b-hf", "--config", path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err


def test_a_deepspeed_file_that_does_not_parse_names_it(tmp_path):
    bad = write(tmp_path, "ds.json", '{"zero_optimization": ')
    args = write(tmp_path, "args.json", TA | {"deepspeed": "ds.json"})
    with pytest.raises(ConfigError, match=r"ds.json: invalid JSON at line 1 column \d+: .* \(named by deepspeed\)"):
        load_training_config(args)
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_training_config(bad)


def test_preflight_inside_a_launch_plans_one_rank_of_it(monkeypatch):
    """torchrun / accelerate launch set WORLD_SIZE and LOCAL_WORLD_SIZE: preflight plans one rank of that launch
    (DDP unless the TrainingArguments name an engine); explicit gpus= still wins."""
    from memplan.integrations.preflight import preflight

    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    e = preflight("llama-2-7b-hf", gpu="a100-80gb", batch_size=2)
    assert (e.setup.gpus, e.setup.nodes, e.setup.strategy) == (4, 2, "ddp")
    assert preflight("llama-2-7b-hf", gpu="a100-80gb", gpus=1, nodes=1).setup.strategy == "single"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert preflight("llama-2-7b-hf", gpu="a100-80gb").setup.gpus == 1
