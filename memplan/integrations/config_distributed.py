"""Several GPUs from the training configs users already have (``memplan.plan.distributed``): GPUs per node, nodes,
the engine (DDP, FSDP / FSDP2, DeepSpeed ZeRO), FSDP's sharding and what is offloaded to the host. Read from an
accelerate config YAML, a DeepSpeed config JSON, and the ``fsdp`` / ``fsdp_config`` / ``deepspeed`` keys of
TrainingArguments, TRL's SFTConfig and axolotl. ``apply_distributed`` runs after a format's table
(``config_tables``), with its bookkeeping (``used``, ``ignored`` with a reason, warnings, notes) and one-line errors
naming the file, the key, the value and what is allowed. A file named by a relative path is looked for beside the
config naming it, then in the working directory."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from memplan.errors import ConfigError, InvalidSetupError, suggestion_suffix
from memplan.fileio import read_text

from .config_features import as_bool
from .config_features import show_value as _show
from .config_skip import SILENT

__all__ = ["apply_distributed", "DEEPSPEED_MARKERS", "DISTRIBUTED_KEYS"]

DEEPSPEED_MARKERS = frozenset({"zero_optimization", "train_micro_batch_size_per_gpu"})

_HANDLED = (None, lambda v, raw: SILENT)  # read by apply_distributed after the table
DISTRIBUTED_KEYS = {  # what each table lists (for the misspelt-key check) and leaves to apply_distributed
    "training_args": dict.fromkeys(("fsdp", "fsdp_config", "deepspeed"), _HANDLED),
    "axolotl": dict.fromkeys(("fsdp", "fsdp_config", "fsdp_version", "deepspeed"), _HANDLED),
    "accelerate": dict.fromkeys(("distributed_type", "num_processes", "num_machines", "fsdp_config",
                                 "deepspeed_config"), _HANDLED),  # and deepspeed/runtime/(zero/)config.py:
    "deepspeed": dict.fromkeys(("zero_optimization", "train_micro_batch_size_per_gpu", "train_batch_size",
                                "gradient_accumulation_steps", "bf16", "bfloat16", "fp16", "optimizer"), _HANDLED)}

# torch.distributed.fsdp.ShardingStrategy in value order (older accelerate configs wrote the numbers 1-5).
_FSDP1 = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")
_TOKENS = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard", "offload", "auto_wrap")
_DEVICES = ("none", "cpu", "nvme")
_DDP_TYPES = ("MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_HPU")
_OFF_TYPES = {"MULTI_CPU": "training on CPU processes", "XLA": "PyTorch/XLA (TPU) training",
              "MULTI_NEURON": "AWS Neuron training", "MEGATRON_LM": "Megatron-LM tensor / pipeline parallelism"}
_DISTRIBUTED_TYPES = ("NO", *_DDP_TYPES, "FSDP", "DEEPSPEED", *_OFF_TYPES)
_BUCKETS = {"reduce_bucket_size": None, "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": None,  # (default)
            "stage3_param_persistence_threshold": None, "stage3_max_live_parameters": 1e9}
_BUCKET_NOTE = ("memplan plans the Trainer's auto values (reduce_bucket_size = hidden^2, stage3_prefetch_bucket_size "
                "= 0.9 x hidden^2, stage3_param_persistence_threshold = 10 x hidden) and DeepSpeed's defaults for the "
                "others")
_NVME = "offload to NVMe is not modelled apart from host RAM: the host figure is what lives off the GPU (on NVMe here)"
_ADAM = ("adam", "adamw", "fusedadam", "cpuadam", "deepspeedcpuadam")
_NO_COUNT = "does not say how many GPUs: the plan is one rank's of --gpus per node x --nodes (1 x 1 unless given)"


def _bad(where: str, key: str, value, what: str, allowed) -> InvalidSetupError:
    allowed = [str(a) for a in allowed]
    hint = suggestion_suffix(str(value).strip(), allowed) if str(value).strip() else ""
    return InvalidSetupError(f"{where}: {key}: unknown {what} {value!r}{hint}; allowed: {', '.join(allowed)}")


def _count(where: str, key: str, v, *, what: str = "an integer >= 1", lo: int = 1) -> int:
    ok = isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit())
    if isinstance(v, bool) or not ok or int(v) < lo:
        raise InvalidSetupError(f"{where}: {key}: expected {what}, got {v!r}")
    return int(v)


def _mapping(where: str, key: str, v) -> Mapping:
    if v is not None and not isinstance(v, Mapping):
        raise InvalidSetupError(f"{where}: {key}: expected a mapping of settings, got {v!r}")
    return v or {}


def _flag(where: str, key: str, v) -> bool:
    try:
        return as_bool(v)
    except InvalidSetupError as exc:
        raise InvalidSetupError(f"{where}: {key}: {exc}") from None


class _Out:
    """What the distributed keys add to one file's mapping (the lists and dicts of ``map_training_config``)."""

    def __init__(self, source, fields, origin, used, ignored, warnings, notes):
        self.source, self.fields, self.origin = source, fields, origin
        self.used, self.ignored, self.warnings, self.notes = used, ignored, warnings, notes

    def set(self, key: str, value, field: str, out, *, match: bool = False) -> None:
        """``field`` = ``out`` because of ``key`` (= ``value``): over a table key's other value, or, with ``match``
        (the Trainer refuses DeepSpeed values that differ from its own), a contradiction."""
        table = self.origin.get(field)
        if table is not None and self.fields.get(field) != out:
            if match:
                raise InvalidSetupError(f"{self.source}: contradictory settings {table[0]}: {_show(table[1])} and "
                                        f"{key}: {_show(value)} (the Trainer refuses DeepSpeed values that differ "
                                        f"from its own); keep one, or write \"auto\"")
            self.used[:] = [u for u in self.used if u[0] != table[0] or u[2] != field]
        self.fields[field] = out
        self.used.append((key, value, field))

    def skip(self, level: str, key: str, value, reason: str) -> None:
        self.ignored.append((key, reason))
        (self.warnings if level == "warning" else self.notes).append(f"{key}={_show(value)}: {reason}")


def _pick(cfg: Mapping, prefix: str, *names: str) -> tuple[str, Any] | None:
    """(shown key, value) of the first of ``names`` (each also with accelerate's ``fsdp_`` prefix) set in ``cfg``."""
    for k in (k for name in names for k in (name, "fsdp_" + name)):
        if cfg.get(k) not in (None, ""):
            return prefix + k, cfg[k]
    return None


def _load(out: _Out, key: str, ref, base_dir, what: str) -> tuple[dict, str] | None:
    """(settings, where read) of a config named by a key: a mapping, a JSON string or file (missing: a warning)."""
    if isinstance(ref, Mapping):
        return dict(ref), out.source
    text, shown, where = str(ref).strip(), out.source, f" (inline in {key})"
    if not text.startswith("{"):
        p = Path(text).expanduser()
        tries = [p] if p.is_absolute() else [Path(d) / p for d in dict.fromkeys([str(base_dir)] * (base_dir is not
                                                                                  None) + [str(Path.cwd())])]
        found = next((t for t in tries if t.is_file()), None)
        if found is None:
            looked = " and ".join(str(t.parent) for t in tries)
            out.skip("warning", key, ref, f"{what} file not found (looked in {looked}): its settings are not planned; "
                                          f"pass --strategy (and --offload)")
            return None
        text, shown, where = read_text(found, missing=f"{what} file not found"), str(found), f" (named by {key})"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{shown}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: expected a mapping of {what} settings, got {type(data).__name__}{where}")
    if shown != out.source:
        out.notes.append(f"{key}={_show(ref)}: read {shown}")
    return data, shown


def _sharding(where: str, key: str, v, version: int) -> str:
    """FSDP1's ShardingStrategy name for a value: a name, its number, or FSDP2's reshard_after_forward bool."""
    if isinstance(v, bool) or str(v).strip().lower() in ("true", "false"):
        return "FULL_SHARD" if _flag(where, key, v) else "SHARD_GRAD_OP"
    s = str(v).strip().rsplit(".", 1)[-1].upper().lstrip("_")
    s = _FSDP1[int(s) - 1] if s.isdigit() and 1 <= int(s) <= len(_FSDP1) else s
    if s not in _FSDP1:
        raise _bad(where, key, v, "FSDP sharding", ("true", "false") if version == 2 else _FSDP1 + ("1-5",))
    if version == 2 and s not in ("FULL_SHARD", "SHARD_GRAD_OP"):
        raise InvalidSetupError(f"{where}: {key}: {v} is an FSDP1 sharding (set the FSDP version to 1); FSDP2 takes "
                                f"reshard_after_forward true (full shard) or false (grad-op)")
    return s


def _fsdp(out: _Out, cfg: Mapping, switch: tuple[str, Any], version, *, tokens=(), nodes: int | None = None) -> None:
    """FSDP (``fsdp``) or FSDP2 (``fsdp2``) from an ``fsdp_config`` mapping and the legacy ``fsdp`` option
    ``tokens``; ``switch`` is the (key, value) that turned FSDP on, ``version`` a (key, value) or the default."""
    where, pre = out.source, "fsdp_config."
    vkey, vval = version if isinstance(version, tuple) else (None, version)
    v = _count(where, vkey, vval, what="an FSDP version, 1 or 2") if vkey else vval
    if v not in (1, 2):
        raise _bad(where, vkey, vval, "FSDP version", (1, 2))
    # FSDP1 reads sharding_strategy first (accelerate: deprecated for reshard_after_forward); FSDP2 ignores it, but
    # a full / grad-op one means what reshard_after_forward does (axolotl's FSDP2 examples write both)
    legacy, reshard = _pick(cfg, pre, "sharding_strategy"), _pick(cfg, pre, "reshard_after_forward")
    toks = [(switch[0], t) for t in tokens if t not in ("offload", "auto_wrap")]
    found = [s for s in ([legacy, reshard, *toks] if v == 1 else [reshard, *toks, legacy]) if s]
    sharding = (*found[0], _sharding(where, *found[0], v)) if found else None
    strategy = "ddp" if sharding and sharding[2] == "NO_SHARD" else "fsdp2" if v == 2 else "fsdp"
    out.set(*switch, "strategy", strategy)
    if vkey:
        out.set(vkey, vval, "strategy", strategy)
    if strategy == "ddp":
        out.set(sharding[0], sharding[1], "strategy", "ddp")
        out.notes.append(f"{sharding[0]}={_show(sharding[1])}: FSDP without sharding keeps a full replica on every "
                         f"GPU, as DDP does: planned as ddp")
    elif sharding:
        key, value, name = sharding
        shard = {"FULL_SHARD": "full", "SHARD_GRAD_OP": "grad-op"}.get(name, "hybrid")
        if shard == "hybrid" and nodes == 1:
            shard = "full" if name == "HYBRID_SHARD" else "grad-op"
            out.notes.append(f"{key}={_show(value)}: hybrid sharding on one machine shards over its GPUs: planned as "
                             f"{shard}")
        elif name == "HYBRID_SHARD_ZERO2":
            out.skip("warning", key, value, "HYBRID_SHARD_ZERO2 keeps each node's gathered parameters from forward "
                                            "to backward: planned as hybrid (resharded), which counts them low")
        out.set(key, value, "fsdp_sharding", shard)
    offload = _pick(cfg, pre, "offload_params", "cpu_offload")  # (over the offload option, as transformers does)
    offload = (*offload, _flag(where, *offload)) if offload else (*switch, True) if "offload" in tokens else None
    if offload and offload[2]:
        if strategy == "ddp":
            out.skip("warning", *offload[:2], "CPU offload under NO_SHARD is not modelled: planned on the GPU")
        else:
            out.set(*offload[:2], "offload", "params")
    ckpt = _pick(cfg, pre, "activation_checkpointing")
    if ckpt and _flag(where, *ckpt):
        out.set(*ckpt, "grad_ckpt", True)
    wrap = _pick(cfg, pre, "auto_wrap_policy")
    if wrap and str(wrap[1]).upper() in ("NO_WRAP", "SIZE_BASED_WRAP"):
        out.skip("warning" if str(wrap[1]).upper() == "NO_WRAP" else "note", *wrap,
                 "planned as one FSDP unit per decoder layer (TRANSFORMER_BASED_WRAP)")


def _fsdp_tokens(where: str, v) -> list[str]:
    if isinstance(v, bool) or v is None:
        return []
    items = v.replace(",", " ").split() if isinstance(v, str) else [str(getattr(t, "value", t)) for t in v]
    tokens = [t.strip().lower() for t in items if t.strip()]
    for t in tokens:
        if t not in _TOKENS:
            raise _bad(where, "fsdp", t, "fsdp option", _TOKENS)
    return tokens


def _offload(out: _Out, zo: Mapping, where: str, name, stage: int) -> None:
    """``offload_optimizer`` / ``offload_param`` (or the deprecated ``cpu_offload`` / ``cpu_offload_param``)."""
    devices = {}
    for part, old in (("optimizer", "cpu_offload"), ("param", "cpu_offload_param")):
        section = zo.get(f"offload_{part}")
        value = section.get("device") if isinstance(section, Mapping) else section
        key = name(f"zero_optimization.offload_{part}" + (".device" if isinstance(section, Mapping) else ""))
        device = "none" if value is None else str(value).strip().lower()
        if section is None and zo.get(old) is not None:  # the deprecated switches
            key, value = name(f"zero_optimization.{old}"), zo[old]
            device = "cpu" if _flag(where, key, value) else "none"
        if device not in _DEVICES:
            raise _bad(where, key, value, "offload device", _DEVICES)
        if device != "none":
            devices[part] = (key, value, device)
    if "param" in devices and stage < 3:
        out.skip("warning", *devices.pop("param")[:2], f"DeepSpeed offloads parameters at ZeRO-3 only: ignored at "
                                                       f"stage {stage}")
    if "optimizer" in devices and stage == 0:
        out.skip("warning", *devices.pop("optimizer")[:2], "DeepSpeed offloads the optimizer at ZeRO stages 1-3: "
                                                           "ignored at stage 0")
    if "param" in devices and "optimizer" not in devices:
        out.warnings.append(f"{devices['param'][0]}={_show(devices['param'][1])} without offload_optimizer: memplan's "
                            f"params offload moves the optimizer too: the optimizer state kept on the GPU is not "
                            f"counted")
    for key, value, _ in devices.values():
        out.set(key, value, "offload", "params" if "param" in devices else "optimizer")
    if any(d[2] == "nvme" for d in devices.values()):
        out.notes.append(_NVME)


def _deepspeed(out: _Out, ds: Mapping, where: str, name, *, default_stage: int = 0, why: str = "DeepSpeed") -> None:
    """ZeRO stage, offload, micro-batch, accumulation, precision and optimizer from a DeepSpeed config; ``name``
    turns a DeepSpeed key into the key shown, ``where`` names the file in errors."""
    zo = _mapping(where, name("zero_optimization"), ds.get("zero_optimization"))
    stage_v, key = zo.get("stage"), name("zero_optimization.stage")
    stage = default_stage if stage_v is None else _count(where, key, stage_v, what="a ZeRO stage 0-3", lo=0)
    if stage > 3:
        raise _bad(where, key, stage_v, "ZeRO stage", (0, 1, 2, 3))
    out.set(key, stage_v, "strategy", ("ddp", "zero1", "zero2", "zero3")[stage])
    if stage_v is None or stage == 0:
        out.notes.append(f"{key}={_show(stage_v)}: " + (f"{why}'s default, stage {stage}" if stage_v is None else
                         "stage 0") + (": partitions nothing (a full replica per GPU), planned as ddp" * (stage == 0)))
    _offload(out, zo, where, name, stage)
    for bucket, default in _BUCKETS.items():
        if type(zo.get(bucket)) in (int, float) and zo[bucket] != default:
            out.skip("note", name(f"zero_optimization.{bucket}"), zo[bucket], _BUCKET_NOTE)
    for extra in ("zero_quantized_weights", "zero_quantized_gradients", "zero_hpz_partition_size", "mics_shard_size"):
        if zo.get(extra) not in (None, False, 0, 1, -1):
            out.skip("warning", name(f"zero_optimization.{extra}"), zo[extra], "ZeRO++ / MiCS is not modelled")
    for key, field in (("train_micro_batch_size_per_gpu", "batch_size"), ("gradient_accumulation_steps", "grad_accum")):
        if ds.get(key) not in (None, "auto"):
            out.set(name(key), ds[key], field, _count(where, name(key), ds[key]), match=True)
    total, micro, accum = (ds.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                "gradient_accumulation_steps"))
    if isinstance(total, int) and not isinstance(total, bool):  # = micro-batch x accumulation x GPUs
        ints = [x for x in (micro, 1 if accum is None else accum) if isinstance(x, int) and not isinstance(x, bool)]
        step = ints[0] * ints[1] if len(ints) == 2 and ints[0] * ints[1] > 0 else 0
        ranks = total // step if step and total % step == 0 else None
        out.skip("note", name("train_batch_size"), total, f"micro-batch x accumulation x {ranks} GPUs: pass --gpus "
                 f"(and --nodes) for them" if ranks else "the global batch: memplan plans the per-GPU micro-batch")
    _precision(out, ds, where, name)
    _optimizer(out, ds.get("optimizer"), name)


def _precision(out: _Out, ds: Mapping, where: str, name) -> None:
    """``bf16`` / ``fp16`` ``enabled``: what the Trainer fills from its own bf16 / fp16 flags (mapped to autocast
    by the tables); "auto" is not set."""
    bf_key = "bfloat16" if "bf16" not in ds and "bfloat16" in ds else "bf16"
    on = {s: _flag(where, name(f"{s}.enabled"), ds[s]["enabled"]) for s in (bf_key, "fp16")
          if isinstance(ds.get(s), Mapping) and ds[s].get("enabled") not in (None, "auto")}
    if on.get(bf_key) and on.get("fp16"):
        raise InvalidSetupError(f"{where}: contradictory settings {name(bf_key + '.enabled')}: true and "
                                f"{name('fp16.enabled')}: true; keep one")
    for section, autocast in ((bf_key, "bf16"), ("fp16", "fp16")):
        if on.get(section) or (section == bf_key and on == {bf_key: False, "fp16": False}):
            out.set(name(f"{section}.enabled"), on[section], "autocast", autocast if on[section] else "off",
                    match=True)


def _optimizer(out: _Out, opt, name) -> None:
    """DeepSpeed's own optimizer replaces the Trainer's ``optim``: Adam-type state is adamw_torch's."""
    if not isinstance(opt, Mapping) or not opt.get("type"):
        return
    kind, key, table = str(opt["type"]), name("optimizer.type"), out.origin.get("optimizer")
    if kind.replace("_", "").lower() not in _ADAM:
        out.skip("warning", key, kind, "this DeepSpeed optimizer is not modelled: planned with the Trainer's optim")
        return
    if table is not None and out.fields.get("optimizer") != "adamw_torch":
        out.notes.append(f"{key}={kind}: the Trainer runs DeepSpeed's optimizer, not {table[0]}={_show(table[1])}: "
                         f"planned as adamw_torch (fp32 Adam state)")
    out.set(key, kind, "optimizer", "adamw_torch")


def _accelerate(out: _Out, raw: Mapping, base_dir) -> None:
    where, nodes, procs = out.source, None, raw.get("num_processes")
    if raw.get("num_machines") is not None:
        nodes = _count(where, "num_machines", raw["num_machines"])
        out.set("num_machines", raw["num_machines"], "nodes", nodes)
    if procs is not None and procs != -1:  # -1: ClusterConfig's "given at launch"
        if _count(where, "num_processes", procs) % (nodes or 1):
            raise InvalidSetupError(f"{where}: num_processes {procs} is not a multiple of num_machines {nodes}: "
                                    f"accelerate runs as many processes on every machine")
        out.set("num_processes", procs, "gpus", int(procs) // (nodes or 1))
    kind = raw.get("distributed_type")
    s = "NO" if kind is False else str(kind).strip().rsplit(".", 1)[-1].upper()  # (YAML 1.1 reads NO as false)
    if kind is None:
        return
    if s not in _DISTRIBUTED_TYPES:
        raise _bad(where, "distributed_type", kind, "distributed_type", _DISTRIBUTED_TYPES)
    if s in _OFF_TYPES:
        out.skip("warning", "distributed_type", kind, f"{_OFF_TYPES[s]} is not modelled: the estimate is for GPUs")
    elif s == "NO" or s in _DDP_TYPES:
        several = out.fields.get("gpus", 1) * (nodes or 1) > 1
        out.set("distributed_type", kind, "strategy", "ddp" if s != "NO" or several else "single")
        if s == "NO" and several:
            out.notes.append(f"distributed_type={kind} with num_processes {procs}: accelerate launches them "
                             f"data-parallel: planned as ddp")
    elif s == "FSDP":
        cfg = _mapping(where, "fsdp_config", raw.get("fsdp_config"))
        _fsdp(out, cfg, ("distributed_type", kind), _pick(cfg, "fsdp_config.", "version") or 1, nodes=nodes or 1)
    else:
        dsc = _mapping(where, "deepspeed_config", raw.get("deepspeed_config"))
        ref = dsc.get("deepspeed_config_file")
        if ref not in (None, "", "none"):
            loaded = _load(out, "deepspeed_config.deepspeed_config_file", ref, base_dir, "DeepSpeed config")
            if loaded:
                out.used.append(("distributed_type", kind, "strategy"))
                _deepspeed(out, loaded[0], loaded[1], lambda k: f"{Path(loaded[1]).name}:{k}")
            return
        out.used.append(("distributed_type", kind, "strategy"))
        names = {"zero_optimization.stage": "zero_stage", "zero_optimization.offload_optimizer.device":
                 "offload_optimizer_device", "zero_optimization.offload_param.device": "offload_param_device"}
        ds = {"zero_optimization": {"stage": dsc.get("zero_stage"), "offload_optimizer": {"device": dsc.get(
            "offload_optimizer_device")}, "offload_param": {"device": dsc.get("offload_param_device")}},
              "gradient_accumulation_steps": dsc.get("gradient_accumulation_steps")}
        _deepspeed(out, ds, where, lambda k: "deepspeed_config." + names.get(k, k), default_stage=2, why="accelerate")


def _trainer(out: _Out, raw: Mapping, fmt: str, base_dir) -> None:
    """TrainingArguments / SFTConfig / axolotl: ``deepspeed`` (a DeepSpeed config) or ``fsdp`` + ``fsdp_config``."""
    where, ds, fsdp, fcfg = out.source, raw.get("deepspeed"), raw.get("fsdp"), raw.get("fsdp_config")
    on = fsdp.strip().lower() not in ("", "false", "no", "none") if isinstance(fsdp, str) else bool(fsdp)
    fsdp_key = "fsdp" if on else "fsdp_config" if fmt == "axolotl" and fcfg else None  # axolotl: fsdp_config alone
    if ds and fsdp_key:
        raise InvalidSetupError(f"{where}: contradictory settings deepspeed: {_show(ds)} and {fsdp_key}: "
                                f"{_show(fsdp) if fsdp_key == 'fsdp' else '{...}'}; keep one")
    before = len(out.used)
    if ds:
        loaded = _load(out, "deepspeed", ds, base_dir, "DeepSpeed config")
        if loaded:
            file = Path(loaded[1]).name if loaded[1] != where else None
            _deepspeed(out, loaded[0], loaded[1], lambda k: f"{file}:{k}" if file else f"deepspeed.{k}")
    elif fsdp_key:
        if isinstance(fcfg, str) and fcfg.strip():  # TrainingArguments: a path to an FSDP config JSON
            fcfg = (_load(out, "fsdp_config", fcfg, base_dir, "FSDP config") or ({},))[0]
        fcfg = fcfg if isinstance(fcfg, Mapping) else {}
        version = _pick(fcfg, "fsdp_config.", "version") or (
            ("fsdp_version", raw["fsdp_version"]) if fmt == "axolotl" and raw.get("fsdp_version") is not None else
            2 if fsdp is True else 1)  # fsdp=True is transformers 5's form (default FSDP2); options are 4.x's
        if version == 1 and fmt != "axolotl":
            out.notes.append(f"fsdp={_show(fsdp)}: planned as FSDP1 as transformers 4.x runs it (5 runs FSDP2): "
                             f"set fsdp_config.version")
        _fsdp(out, fcfg, (fsdp_key, fsdp if fsdp_key == "fsdp" else True), version, tokens=_fsdp_tokens(where, fsdp))
    if any(u[2] == "strategy" for u in out.used[before:]):
        out.notes.append(f"the file {_NO_COUNT}")


def apply_distributed(fmt: str, raw: Mapping[str, Any], *, source: str, base_dir, fields: dict,
                      origin: Mapping[str, tuple[str, Any]], used: list, ignored: list, warnings: list,
                      notes: list) -> None:
    """Add the distributed settings of one config (format ``fmt``, parsed ``raw``) to what its table set, in place;
    ``origin`` gives each field the table set (its key, the value in the file). ``base_dir``: the config's folder
    (None: the working directory only)."""
    out = _Out(source, fields, origin, used, ignored, warnings, notes)
    if fmt == "accelerate":
        _accelerate(out, raw, base_dir)
    elif fmt == "deepspeed":
        _deepspeed(out, raw, source, lambda k: k)
        notes.append(f"a DeepSpeed config {_NO_COUNT}")
    elif fmt in ("training_args", "trl", "axolotl"):
        _trainer(out, raw, fmt, base_dir)
