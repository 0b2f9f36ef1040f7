"""Reproduce the measurements docs/memory-model.md rests on, and print them.

    python benchmarks/memory_facts.py            # everything: about 80 s on 2 CPU cores, 2.2 GB of RAM
    python benchmarks/memory_facts.py --quick    # skips the slow parts (marked "full run only"): about 30 s, 0.9 GB
    python benchmarks/memory_facts.py --only AD  # some sections

Needs the ``profile`` extras on a CPU build of torch (torch, transformers, peft, bitsandbytes, accelerate). No GPU
and no network: models are built from the config.json values in profiles/models/, and HF_HUB_OFFLINE is set.
Every line names what it measures; byte counts are exact and do not depend on the machine (the times do).

Sections (docs/memory-model.md quotes each):

A. bitsandbytes 4-bit storage: ``bitsandbytes.functional.quantize_4bit`` on real CPU tensors, the bytes of the
   packed weight and of every tensor of its ``QuantState``.
B. OPT-13B on the meta device: parameter count (tied lm_head), the ``accelerate.init_empty_weights`` gotcha, the
   LoRA r=16 q,v adapter through peft, and the fp32 upcast of ``prepare_model_for_kbit_training`` (memplan's
   fake QLoRA build).
C. Optimizer state on real CPU tensors: torch AdamW and bitsandbytes AdamW8bit.
D. ``memplan.measure.simulate`` of OPT-13B against the analytic ``estimate_for(..., include_runtime=False)``, and
   the per-op attribution of what is alive at the simulated peak.
E. Exactness: a real CPU training run of a tiny OPT against its fake-tensor simulation (CPU semantics) under the
   same tracker, and memplan's tracker against torch's own ``MemTracker``.
F. What the alternatives to memplan's build raise (the errors "How simulate builds a model" cites).

Section D's attribution and section E's cross-check read the tracker's event log through private attributes of
``memplan.measure.tracker.MemoryTracker`` (``_born``, ``_died``, ``_size``, ...): this script is a measurement,
not an API user, and is updated with the tracker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 2**20


def out(section: str, text: str) -> None:
    print(f"{section}  {text}", flush=True)


def b(n: int) -> str:
    return f"{n:,} B"


def mib(n: int) -> str:
    return f"{n / MiB:,.2f} MiB"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"


def storage_bytes(t) -> int:
    return t.untyped_storage().nbytes()


# ---------------------------------------------------------------------------------------------------------------
# A. bitsandbytes 4-bit storage


def section_a(quick: bool) -> None:
    import bitsandbytes.functional as BF
    import torch

    shapes = [(2048, 2048), (4096, 4096), (5120, 5120)] + ([] if quick else [(20480, 5120)])
    torch.manual_seed(0)
    for shape in shapes:
        w = torch.randn(*shape, dtype=torch.float16)
        n = w.numel()
        for dq in (False, True):
            packed, qs = BF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
            parts = [("packed uint8", packed), ("absmax", qs.absmax), ("code", qs.code)]
            if dq:
                parts += [("offset", qs.offset), ("state2.absmax", qs.state2.absmax), ("state2.code", qs.state2.code)]
            total = sum(storage_bytes(t) for _, t in parts)
            detail = ", ".join(f"{name} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')} {storage_bytes(t):,}"
                               for name, t in parts)
            out("A", f"quantize_4bit nf4 blocksize 64 {shape[0]}x{shape[1]} double_quant={'on ' if dq else 'off'}: "
                     f"{total / n:.6f} B/param ({b(total)}: {detail})")
    # The limits for a large layer, from the sizes above: 0.5 + 4/64 and 0.5 + 1/64 + 4/(64*256).
    out("A", f"per-param limit without double quant 0.5 + 4/64 = {0.5 + 4 / 64:.6f}; "
             f"with double quant 0.5 + 1/64 + 4/(64*256) = {0.5 + 1 / 64 + 4 / (64 * 256):.6f} B/param")
    # Is the 16-entry code shared between layers? (quantize_4bit calls get_4bit_type per call)
    _, q1 = BF.quantize_4bit(torch.randn(64, 64), quant_type="nf4", compress_statistics=True)
    _, q2 = BF.quantize_4bit(torch.randn(64, 64), quant_type="nf4", compress_statistics=True)
    out("A", f"two quantize_4bit calls share the 16-entry code: {q1.code.data_ptr() == q2.code.data_ptr()}; "
             f"share the 256-entry state2 code: {q1.state2.code.data_ptr() == q2.state2.code.data_ptr()}")

    # memplan's analytic count for OPT-13B (plan.weights.static_terms, 512-byte rounding per tensor)
    from memplan.catalog.models import load_model
    from memplan.plan.setup import TrainSetup, resolve_setup
    from memplan.plan.weights import static_terms

    spec = load_model("opt-13b")
    for dq in (False, True):
        setup = resolve_setup(TrainSetup("opt-13b", method="qlora", double_quant=dq), spec)
        st = static_terms(spec, setup)
        out("A", f"memplan.plan.weights.static_terms OPT-13B nf4 double_quant={'on ' if dq else 'off'}: packed "
                 f"{b(st.quantized)} + constants {b(st.quant_constants)} over {st.quantized_values:,} values = "
                 f"{(st.quantized + st.quant_constants) / st.quantized_values:.6f} B/param")


# ---------------------------------------------------------------------------------------------------------------
# B. OPT-13B on the meta device


def opt13b_config():
    import transformers

    values = json.loads((ROOT / "profiles" / "models" / "opt-13b.json").read_text())["config"]
    values = {k: v for k, v in values.items() if k not in ("model_type", "transformers_version")}
    cfg = transformers.AutoConfig.for_model("opt", **values)
    cfg.use_cache = False
    return cfg


def section_b() -> None:
    import accelerate
    import peft
    import torch
    import transformers

    cfg = opt13b_config()
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    seconds = time.perf_counter() - t0
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    tied = model.lm_head.weight is model.model.decoder.embed_tokens.weight
    linears = sum(1 for m in model.modules() if type(m) is torch.nn.Linear)
    out("B", f"OPT-13B from profiles/models/opt-13b.json on torch.device('meta'), fp16: {total:,} parameters, "
             f"lm_head tied to embed_tokens: {tied}, nn.Linear modules: {linears} ({seconds:.2f} s)")
    out("B", f"fp16 base weights: {total:,} x 2 B = {b(total * 2)} = {mib(total * 2)}")
    with accelerate.init_empty_weights():
        untied = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    out("B", f"same under accelerate.init_empty_weights(): {sum(p.numel() for p in untied.parameters()):,} "
             f"parameters, lm_head tied: {untied.lm_head.weight is untied.model.decoder.embed_tokens.weight}")
    del untied

    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.05,
                           task_type="CAUSAL_LM")
    pm = peft.get_peft_model(model, lora)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trainable)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainable})
    out("B", f"peft get_peft_model LoRA r=16 on q_proj,v_proj: {n:,} trainable values in {len(trainable)} tensors, "
             f"dtype {','.join(dtypes)}; 40 x 2 x 16 x (5120 + 5120) = {40 * 2 * 16 * (5120 + 5120):,}; "
             f"{n:,} x 4 B = {mib(n * 4)}")
    del pm, model

    # prepare_model_for_kbit_training's fp32 upcast, in memplan's fake QLoRA build (the build simulate uses)
    from memplan.catalog.models import load_model
    from memplan.measure.build import build_training_model
    from memplan.plan.setup import TrainSetup, resolve_setup

    spec = load_model("opt-13b")
    setup = resolve_setup(TrainSetup("opt-13b", method="qlora", rank=16, targets="q_proj,v_proj", dtype="bf16"), spec)
    t0 = time.perf_counter()
    qm, info = build_training_model(spec, setup, fake=True)
    seconds = time.perf_counter() - t0
    base = qm.get_base_model()
    emb = base.model.decoder.embed_tokens.weight
    out("B", f"QLoRA build (nf4 + double quant, bf16 compute, prepare_model_for_kbit_training): "
             f"{len(info.quantized_modules)} Linear4bit modules, {info.quantized_values:,} values in 4 bits; "
             f"embed_tokens {tuple(emb.shape)} {str(emb.dtype).replace('torch.', '')} = {b(storage_bytes(emb))} = "
             f"{mib(storage_bytes(emb))}; lm_head tied to it: {base.lm_head.weight is emb} ({seconds:.2f} s)")
    float_dtypes = defaultdict(int)
    for p in qm.parameters():
        if not p.requires_grad and p.dtype != torch.uint8:
            float_dtypes[str(p.dtype).replace("torch.", "")] += p.numel()
    out("B", "QLoRA build, frozen non-quantized parameters by dtype: "
             + ", ".join(f"{k} {v:,}" for k, v in sorted(float_dtypes.items())))
    del qm, base, emb

    # bitsandbytes Linear4bit.forward casts its bias to the compute dtype in place (bias.data = ...): after the
    # first forward the upcast fp32 biases of the 4-bit layers are 16-bit again. A real tiny QLoRA model shows it.
    from memplan.catalog.models import spec_from_config

    tiny = spec_from_config(TINY_OPT, name="tiny-opt")
    tsetup = resolve_setup(TrainSetup("tiny-opt", method="qlora", dtype="bf16"), tiny)
    torch.manual_seed(0)
    tm, _ = build_training_model(tiny, tsetup, fake=False)
    layer = tm.get_base_model().model.decoder.layers[0]
    before = (layer.fc1.bias.dtype, layer.final_layer_norm.weight.dtype)
    ids = torch.randint(0, tiny.vocab_size, (1, 16))
    tm(input_ids=ids, labels=ids).loss.backward()
    after = (layer.fc1.bias.dtype, layer.final_layer_norm.weight.dtype)
    out("B", f"tiny real QLoRA (bf16 compute): Linear4bit fc1.bias {before[0]} -> {after[0]} after one forward; "
             f"LayerNorm weight {before[1]} -> {after[1]}".replace("torch.", ""))


# ---------------------------------------------------------------------------------------------------------------
# C. optimizer state


def _state_bytes(opt) -> tuple[int, dict]:
    seen, total, parts = set(), 0, {}
    for state in opt.state.values():
        for k, v in state.items():
            if hasattr(v, "untyped_storage"):
                key = v.untyped_storage().data_ptr(), storage_bytes(v)
                parts[k] = f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
                if key not in seen:
                    seen.add(key)
                    total += storage_bytes(v)
    return total, parts


def section_c() -> None:
    import bitsandbytes as bnb
    import torch

    for shape in [(16, 5120), (4095,)]:
        for name, cls in (("torch.optim.AdamW", torch.optim.AdamW), ("bnb.optim.AdamW8bit", bnb.optim.AdamW8bit)):
            p = torch.nn.Parameter(torch.randn(*shape))
            opt = cls([p], lr=1e-3)
            p.grad = torch.randn_like(p)
            opt.step()
            total, parts = _state_bytes(opt)
            out("C", f"{name} on an fp32 {shape} parameter ({p.numel():,} values): state {b(total)} "
                     f"({'; '.join(f'{k} {v}' for k, v in parts.items())})")
    n = 16 * 5120
    out("C", f"memplan's 8-bit count for {n:,} values: 2 x ({n:,} + ceil({n:,}/256) x 4) = "
             f"{2 * (n + -(-n // 256) * 4):,} B (the shared 256-entry qmaps are not counted)")


# ---------------------------------------------------------------------------------------------------------------
# D. simulate vs estimate, and what is alive at the peak


def _tracker_class():
    from memplan.measure.tracker import MemoryTracker

    class AttributingTracker(MemoryTracker):
        """MemoryTracker that also remembers, per storage, the op that created it and the tensor's dtype/shape."""

        def __init__(self, **kw):
            super().__init__(**kw)
            self.origin: list[tuple] = []
            self._op = "registered"
            self._desc = ("?", ())

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self._op = func.name() if hasattr(func, "name") else str(func)
            try:
                return super().__torch_dispatch__(func, types, args, kwargs)
            finally:
                self._op = "registered"

        def _see(self, t):
            self._desc = (str(t.dtype).replace("torch.", ""), tuple(t.shape))
            return super()._see(t)

        def _mark(self, t, category):
            self._desc = (str(t.dtype).replace("torch.", ""), tuple(t.shape))
            return super()._mark(t, category)

        def _record(self, st, lastdim):
            before = len(self._size)
            idx = super()._record(st, lastdim)
            if len(self._size) > before:
                self.origin.append((self._op,) + self._desc)
            return idx

    return AttributingTracker


@contextlib.contextmanager
def attributing_simulate():
    """Run memplan.measure.simulate with an AttributingTracker inside its StepRecorder; yields a dict that
    receives the tracker."""
    import memplan.measure.simulate as sim_mod

    tracker_cls = _tracker_class()
    holder: dict = {}
    original = sim_mod.StepRecorder

    class Recorder(original):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.tracker = tracker_cls(round_to=kw.get("round_to", 1), vocab_size=kw.get("vocab_size"))
            holder["tracker"] = self.tracker

    sim_mod.StepRecorder = Recorder
    try:
        yield holder
    finally:
        sim_mod.StepRecorder = original


def replay(trk):
    """Replay the tracker's log like MemoryTracker.result: the sequence number of the overall peak and of the last
    forward's peak."""
    end = trk._exit_seq if trk._exit_seq is not None else trk._seq
    n = len(trk._size)
    size = [0 if i in trk._excluded else trk._size[i] for i in range(n)]
    events = []
    for i in range(n):
        if trk._born[i] <= end:
            events.append((trk._born[i], size[i]))
            if trk._died[i] != -1 and trk._died[i] <= end:
                events.append((trk._died[i], -size[i]))
    events.sort()
    phase_starts = [(p[2], p[0]) for p in trk._phases]
    level = peak = fwd_peak = 0
    peak_seq = fwd_seq = 0
    ph = 0
    for seq, delta in events:
        while ph + 1 < len(phase_starts) and phase_starts[ph + 1][0] <= seq:
            ph += 1
            if phase_starts[ph][1] == "forward":
                fwd_peak = 0  # keep the last step's forward
        level += delta
        if delta <= 0:
            continue
        if level > peak:
            peak, peak_seq = level, seq
        if phase_starts[ph][1] == "forward" and level > fwd_peak:
            fwd_peak, fwd_seq = level, seq
    return size, peak, peak_seq, fwd_peak, fwd_seq


def alive_at(trk, size, seq):
    return [i for i in range(len(size)) if trk._born[i] <= seq and (trk._died[i] == -1 or trk._died[i] > seq)]


OPT_LABELS = {
    ("aten::native_dropout", "float32"): "LoRA dropout outputs = lora_A inputs (fp32, h wide)",
    ("aten::native_dropout", "bool"): "dropout masks (bool, h wide): 2 LoRA + 2 residual per layer",
    ("aten::relu", "float16"): "ReLU output (fp16, 4h wide), saved by relu and fc2",
    ("aten::add.Tensor", "float16"): "residual sums (fp16): LayerNorm inputs; with checkpointing, layer inputs",
    ("aten::mul.Tensor", "float16"): "q * scaling (fp16), saved by attention",
    ("aten::addmm", "float16"): "k = k_proj output (fp16), saved by attention",
    ("aten::_to_copy", "float16"): "v = v_proj + LoRA cast back to fp16, saved by attention",
    ("aten::_scaled_dot_product_flash_attention", "float16"): "attention output (fp16), saved by flash",
    ("aten::_scaled_dot_product_flash_attention", "float32"): "flash logsumexp (fp32, per head and token)",
    ("aten::_scaled_dot_product_flash_attention", "uint64"): "flash philox seed and offset",
    ("aten::mm", "float32"): "lora_A outputs (fp32, r wide), saved by lora_B",
    ("aten::native_layer_norm", "float16"): "LayerNorm mean and rstd (fp16 on CPU kernels; CUDA: fp32)",
    ("aten::embedding", "float16"): "embed_tokens output (made to require grad by enable_input_require_grads)",
    ("aten::randint.low", "int64"): "input_ids",
    ("aten::clone", "int64"): "labels",
    ("aten::_to_copy", "float32"): "fp32 copy of the logits",
    ("aten::mm", "float16"): "logits (lm_head output, fp16)",
    ("aten::_log_softmax", "float32"): "log-softmax output (fp32), saved by nll_loss",
    ("aten::nll_loss_backward", "float32"): "gradient of nll_loss (fp32)",
    ("aten::_log_softmax_backward_data", "float32"): "gradient of log-softmax (fp32)",
}


def attribution(trk, size, indices, *, tokens, hidden, layers, vocab):
    groups = defaultdict(lambda: [0, 0])
    for i in indices:
        cat = trk._category(i)
        if cat not in ("activations", "logits_loss"):
            continue
        op, dtype, _shape = trk.origin[i]
        g = groups[(cat, op, dtype)]
        g[0] += 1
        g[1] += size[i]
    rows = sorted(groups.items(), key=lambda kv: (kv[0][0] != "activations", -kv[1][1]))
    for (cat, op, dtype), (count, nbytes) in rows:
        label = OPT_LABELS.get((op, dtype), "other")
        if cat == "activations":
            per = f"{nbytes / (tokens * hidden * layers):.4f} B per token x hidden x layer"
        else:
            per = f"{nbytes / (tokens * vocab):.2f} B per token x vocab"
        yield f"{cat:<12} {op} {dtype} x{count}: {b(nbytes)} = {per}  [{label}]"


def section_d(quick: bool) -> None:
    from memplan.catalog.models import load_model
    from memplan.measure.simulate import simulate_for
    from memplan.plan.breakdown import COMPONENTS, PHASES
    from memplan.plan.estimate import estimate_for
    from memplan.plan.setup import TrainSetup, resolve_setup

    spec = load_model("opt-13b")
    tokens = 512

    def compare(title, setup, semantics="cuda", attribute=False):
        t0 = time.perf_counter()
        if attribute:
            with attributing_simulate() as holder:
                sim = simulate_for(spec, setup, device_semantics=semantics)
        else:
            sim = simulate_for(spec, setup, device_semantics=semantics)
        seconds = time.perf_counter() - t0
        est = estimate_for(spec, setup, include_runtime=False)
        out("D", f"{title}: simulate ({semantics} semantics, 2 steps, {seconds:.1f} s) peak {b(sim.total_bytes)} = "
                 f"{mib(sim.total_bytes)} at {sim.peak_phase}; estimate (include_runtime=False) {b(est.total_bytes)} "
                 f"= {mib(est.total_bytes)} at {est.peak_phase}; estimate/simulate = "
                 f"{est.total_bytes / sim.total_bytes:.4f}")
        for c in COMPONENTS:
            if sim.components[c] or est.components[c]:
                out("D", f"    {c:<18} simulate {sim.components[c]:>15,} B {mib(sim.components[c]):>14}   estimate "
                         f"{est.components[c]:>15,} B {mib(est.components[c]):>14}")
        out("D", "    phase peaks (simulate / estimate): " + "; ".join(
            f"{p} {mib(sim.phases[p])} / {mib(sum(est.phases[p].values()))}" for p in PHASES if p in sim.phases))
        out("D", f"    simulate step peaks {', '.join(mib(x) for x in sim.step_peaks)}; notes: {' | '.join(sim.notes)}")
        return sim, (holder["tracker"] if attribute else None)

    lora = dict(rank=16, alpha=32, targets="q_proj,v_proj", lora_dropout=0.05, batch_size=1, seq_len=tokens)
    setup = resolve_setup(TrainSetup("opt-13b", dtype="fp16", attn="sdpa", **lora), spec)
    sim, trk = compare("OPT-13B fp16 LoRA r=16 q,v, AdamW, batch 1, seq 512, no checkpointing", setup, attribute=True)

    size, peak, peak_seq, fwd_peak, fwd_seq = replay(trk)
    alive = alive_at(trk, size, peak_seq)
    assert peak == sim.total_bytes == sum(size[i] for i in alive), "replay differs from the tracker's result"
    out("D", f"per-op attribution of the activations and logits alive at the peak ({sim.peak_phase}, "
             f"{b(peak)}); per-layer figures divide by {tokens} tokens x 5120 x 40 layers:")
    dims = dict(tokens=tokens, hidden=spec.hidden_size, layers=spec.num_layers, vocab=spec.vocab_size)
    for line in attribution(trk, size, alive, **dims):
        out("D", "    " + line)
    fwd_alive = alive_at(trk, size, fwd_seq)
    logits_fwd = sum(size[i] for i in fwd_alive if trk._category(i) == "logits_loss")
    out("D", f"logits and loss alive at the forward peak ({b(fwd_peak)}): {b(logits_fwd)} = "
             f"{logits_fwd / (tokens * spec.vocab_size):.2f} B per token x vocab:")
    for line in attribution(trk, size, [i for i in fwd_alive if trk._category(i) == "logits_loss"], **dims):
        out("D", "    " + line)
    del trk

    if quick:
        out("D", "(--quick: CPU semantics, gradient checkpointing and QLoRA simulations skipped)")
        return
    # full run only
    cpu = simulate_for(spec, setup, device_semantics="cpu")
    out("D", f"same setup with CPU semantics (full run only): peak {b(cpu.total_bytes)} = {mib(cpu.total_bytes)}, "
             f"activations {mib(cpu.components['activations'])} (CUDA semantics: "
             f"{mib(sim.components['activations'])}); difference {mib(cpu.total_bytes - sim.total_bytes)}")
    gc_sim, gc_trk = compare("OPT-13B fp16 LoRA, gradient checkpointing (full run only)",
                             resolve_setup(TrainSetup("opt-13b", dtype="fp16", attn="sdpa", grad_ckpt=True, **lora),
                                           spec), attribute=True)
    size, peak, peak_seq, _, _ = replay(gc_trk)
    out("D", f"per-op attribution at the checkpointed peak ({gc_sim.peak_phase}, {b(peak)}):")
    for line in attribution(gc_trk, size, alive_at(gc_trk, size, peak_seq), **dims):
        out("D", "    " + line)
    del gc_trk
    compare("OPT-13B QLoRA nf4 + double quant, bf16 compute, gradient checkpointing (full run only)",
            resolve_setup(TrainSetup("opt-13b", method="qlora", dtype="bf16", attn="sdpa", grad_ckpt=True, **lora),
                          spec))


# ---------------------------------------------------------------------------------------------------------------
# E. real CPU run == fake CPU simulation; memplan's tracker == torch's MemTracker

TINY_OPT = {"model_type": "opt", "vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 4, "ffn_dim": 1024,
            "num_attention_heads": 4, "max_position_embeddings": 512, "word_embed_proj_dim": 256}


def _real_run(spec, setup, steps):
    """What memplan profile does on a CPU: real tensors, the same step loop and tracker as simulate."""
    import torch

    from memplan.measure.build import build_training_model
    from memplan.measure.optimizer import make_optimizer
    from memplan.measure.recorder import StepRecorder
    from memplan.measure.step import run_steps

    torch.manual_seed(0)
    model, _ = build_training_model(spec, setup, fake=False, device="cpu")
    rec = StepRecorder(vocab_size=spec.vocab_size)
    rec.register_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(setup, trainable)
    rec.watch(trainable, opt)
    with rec:
        run_steps(model, opt, rec, spec, setup, steps=steps)
    return rec.tracker.result()


def _memtracker_run(spec, setup, steps):
    """The same real run under torch.distributed._tools.mem_tracker.MemTracker (its own accounting)."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    from memplan.measure.build import build_training_model
    from memplan.measure.optimizer import make_optimizer
    from memplan.measure.recorder import StepRecorder
    from memplan.measure.step import run_steps

    class FrozenParamsMemTracker(MemTracker):
        # MemTracker hooks every parameter with register_hook, which raises for frozen ones ("cannot register a
        # hook on a tensor that doesn't require gradient"): hook the trainable ones only.
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            def grad_hook(grad):
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            param_mem = buffer_mem = 0
            for p in module.parameters():
                param_mem += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(p, _MemRefType.PARAM))
                if p.grad is not None:
                    self._update_and_maybe_create_winfos(p.grad, _MemRefType.GRAD)
                if install_grad_hooks and p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (
                        p.register_hook(grad_hook), p.register_post_accumulate_grad_hook(lambda q: grad_hook(q.grad)))
            for buf in module.buffers():
                buffer_mem += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(buf, _MemRefType.BUFFER))
            return param_mem, buffer_mem

    torch.manual_seed(0)
    model, _ = build_training_model(spec, setup, fake=False, device="cpu")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(setup, trainable)
    mt = FrozenParamsMemTracker()
    mt.track_external(model, opt)
    with mt:
        run_steps(model, opt, StepRecorder(track_tensors=False), spec, setup, steps=steps)
    return mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def section_e(quick: bool) -> None:
    from memplan.catalog.models import spec_from_config
    from memplan.measure.simulate import simulate_for
    from memplan.plan.breakdown import COMPONENTS
    from memplan.plan.setup import TrainSetup, resolve_setup

    spec = spec_from_config(TINY_OPT, name="tiny-opt")
    base = dict(rank=8, targets="q_proj,v_proj", batch_size=2, seq_len=128)
    cases = [("fp32", dict(bits=32))]
    if not quick:
        cases += [("bf16", dict(bits=16, dtype="bf16")),
                  ("fp32 + gradient checkpointing", dict(bits=32, grad_ckpt=True)),
                  ("QLoRA nf4 + double quant, bf16", dict(method="qlora", dtype="bf16")),
                  ("QLoRA + checkpointing + AdamW8bit", dict(method="qlora", dtype="bf16", grad_ckpt=True,
                                                              optimizer="adamw_bnb_8bit"))]
    out("E", "tiny OPT (hidden 256, 4 layers, vocab 1000), LoRA r=8 on q_proj,v_proj, batch 2, seq 128, 2 steps")
    for name, kw in cases:
        setup = resolve_setup(TrainSetup("tiny-opt", **base, **kw), spec)
        t0 = time.perf_counter()
        sim = simulate_for(spec, setup, device_semantics="cpu", steps=2)
        t1 = time.perf_counter()
        real = _real_run(spec, setup, steps=2)
        t2 = time.perf_counter()
        same = (sim.total_bytes == real.peak_bytes and list(sim.step_peaks) == real.step_peaks
                and sim.phase_peaks == real.phase_peaks and sim.final_bytes == real.final_bytes
                and sim.components == {c: real.peak_components[c] for c in COMPONENTS})
        steps = ", ".join(f"{x:,}" for x in real.step_peaks)
        out("E", f"{name}: real CPU run peak {b(real.peak_bytes)} (steps {steps}; "
                 f"{t2 - t1:.1f} s) vs fake CPU simulation {b(sim.total_bytes)} ({t1 - t0:.1f} s); peak, step peaks, "
                 f"phase peaks, breakdown and final bytes identical: {same}")
    setup = resolve_setup(TrainSetup("tiny-opt", **base, bits=32), spec)
    one = _real_run(spec, setup, steps=1)
    mt = _memtracker_run(spec, setup, steps=1)
    out("E", f"fp32, 1 step: memplan MemoryTracker {b(one.peak_bytes)} vs torch MemTracker {b(mt)}: "
             f"equal: {one.peak_bytes == mt}")


# ---------------------------------------------------------------------------------------------------------------
# F. the errors behind memplan's build


_FAKE_CUDA_BACKWARD = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
with FakeTensorMode():
    x = torch.empty(3, device="cuda", requires_grad=True)
    (x * 2).sum().backward()
print("backward on fake cuda survived")
"""


def section_f() -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF
    import peft
    import torch
    import torch.nn.functional as F
    import transformers
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode
    from torch.utils.checkpoint import checkpoint

    tiny = transformers.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                  vocab_size=1000, word_embed_proj_dim=64, max_position_embeddings=128)

    def attempt(what, fn):
        try:
            result = fn()
            out("F", f"{what}: no error ({result})")
        except BaseException as exc:  # noqa: BLE001 - the error is the measurement
            cause = f" <- caused by {first_line(exc.__cause__)}" if exc.__cause__ is not None else ""
            out("F", f"{what}: {first_line(exc)}{cause}")

    def build_in_fake_then_peft():
        with FakeTensorMode(allow_non_fake_inputs=True):
            m = transformers.AutoModelForCausalLM.from_config(tiny)
            peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    attempt("model built inside FakeTensorMode, then peft.get_peft_model", build_in_fake_then_peft)

    with torch.device("meta"):
        m = transformers.AutoModelForCausalLM.from_config(tiny)
    tied_meta = m.lm_head.weight is m.model.decoder.embed_tokens.weight
    with FakeTensorMode(allow_non_fake_inputs=True):
        m.to_empty(device="cpu")
        tied_after = m.lm_head.weight is m.model.decoder.embed_tokens.weight
        m.tie_weights()
        tied_retied = m.lm_head.weight is m.model.decoder.embed_tokens.weight
    out("F", f"lm_head tied to embed_tokens: on meta {tied_meta}, after to_empty(device='cpu') {tied_after}, "
             f"after tie_weights() {tied_retied}")

    def fake_quantize():
        with FakeTensorMode():
            BF.quantize_4bit(torch.randn(64, 64), compress_statistics=True, quant_type="nf4")

    # bitsandbytes caches its 8-bit dynamic map (functional.name2qmap) on first use: the error depends on whether
    # a real quantization ran before in the process.
    cached = dict(BF.name2qmap)
    BF.name2qmap.clear()
    try:
        attempt("bitsandbytes quantize_4bit(fake tensor, compress_statistics=True), first use in the process",
                fake_quantize)
    finally:
        BF.name2qmap.clear()
        BF.name2qmap.update(cached)
    BF.quantize_4bit(torch.randn(64, 64), compress_statistics=True, quant_type="nf4")  # fills the cache
    attempt("the same after a real quantize_4bit filled bitsandbytes' dynamic-map cache", fake_quantize)

    def fake_params4bit():
        with FakeTensorMode():
            bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False)

    attempt("bnb.nn.Params4bit(fake tensor)", fake_params4bit)

    def meta_linear4bit_to():
        bnb.nn.Linear4bit(64, 64, device="meta").to("cpu")

    attempt("bnb.nn.Linear4bit(device='meta').to('cpu')", meta_linear4bit_to)

    def meta_quantize():
        q, _ = BF.quantize_4bit(torch.empty(64, 64, device="meta"), quant_type="nf4", compress_statistics=True)
        return f"returns a {q.device.type} tensor {tuple(q.shape)}, no values"

    attempt("bitsandbytes quantize_4bit(meta tensor)", meta_quantize)

    def fake_cuda_to():
        with FakeTensorMode(allow_non_fake_inputs=True):
            torch.empty(3).to("cuda")

    attempt("fake tensor .to('cuda') on the CPU build of torch", fake_cuda_to)

    def fake_cuda_factory():
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.empty(4, 4, device="cuda")
            return f"factory + matmul without grad give {(x @ x).device}"

    attempt("fake tensor created with device='cuda', matmul without grad", fake_cuda_factory)

    proc = subprocess.run([sys.executable, "-c", _FAKE_CUDA_BACKWARD], capture_output=True, text=True,
                          timeout=120, check=False)
    what = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip().startswith(("terminate", "what()"))]
    out("F", f"backward through a fake cuda leaf on the CPU build (in a subprocess): exit code {proc.returncode}; "
             f"{' / '.join(what) or proc.stdout.strip()}")

    class CudaDropoutMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.dropout:
                return torch.native_dropout(args[0], kwargs.get("p", args[1] if len(args) > 1 else 0.5), True)[0]
            return func(*args, **kwargs)

    def dropout_mode_with_checkpoint():
        lin = torch.nn.Linear(8, 8)
        x = torch.randn(4, 8, requires_grad=True)
        with CudaDropoutMode():
            y = checkpoint(lambda t: F.dropout(lin(t), 0.1, True) * 2, x, use_reentrant=False)
        y.sum().backward()

    attempt("native_dropout swapped in by a TorchFunctionMode, under non-reentrant checkpointing",
            dropout_mode_with_checkpoint)

    def flash_named_attention():
        transformers.AttentionInterface.register("simflash", lambda *a, **k: None)
        try:
            transformers.AutoModelForCausalLM.from_config(tiny, attn_implementation="simflash")
        finally:
            transformers.AttentionInterface._global_mapping.pop("simflash", None)

    attempt("an attention function registered as 'simflash'", flash_named_attention)

    def memtracker_frozen():
        from torch.distributed._tools.mem_tracker import MemTracker

        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        net[0].weight.requires_grad_(False)
        with MemTracker():
            net(torch.randn(2, 4)).sum().backward()

    attempt("torch MemTracker on a module with a frozen parameter", memtracker_frozen)


# ---------------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="skip the slow parts (about 30 s instead of 80 s)")
    ap.add_argument("--only", default="ABCDEF", help="sections to run, e.g. --only AD (default ABCDEF)")
    opts = ap.parse_args()

    t0 = time.perf_counter()
    warnings.simplefilter("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes
    import peft
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    out("-", f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
             f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}; cuda available: "
             f"{torch.cuda.is_available()}; {os.cpu_count()} CPUs; imports {time.perf_counter() - t0:.1f} s")
    sections = {"A": lambda: section_a(opts.quick), "B": section_b, "C": section_c,
                "D": lambda: section_d(opts.quick), "E": lambda: section_e(opts.quick), "F": section_f}
    for key in opts.only.upper():
        t = time.perf_counter()
        sections[key]()
        out(key, f"(section {key}: {time.perf_counter() - t:.1f} s)")
    out("-", f"total {time.perf_counter() - t0:.1f} s{' (--quick)' if opts.quick else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
