"""The analytic estimator, pinned with hand-computed expectations. Each expected number is derived in a
comment; the OPT-13B ones are the byte counts measured in docs/memory-model.md."""

from __future__ import annotations

import pytest

from memplan.errors import InvalidSetupError
from memplan.plan.estimate import COMPONENTS, PHASES, estimate, estimate_for
from memplan.catalog.gpus import load_gpu
from memplan.catalog.models import load_model
from memplan.plan.setup import TrainSetup, resolve_setup

MiB = 2**20

# OPT-13B: 40 layers, hidden 5120, 40 heads (head_dim 128), ffn 20480, vocab 50272, tied lm_head,
# dropout 0.1, LayerNorm (facebook/opt-13b config.json).
OPT13B_PARAMS = 12_853_473_280  # docs/memory-model.md, "Base weights": meta-device count
OPT13B_LORA_R16_QV = 13_107_200  # 40 layers x 2 modules x 16 x (5120 + 5120)


def _est(**kw):
    kw.setdefault("model", "opt-13b")
    return estimate(TrainSetup(**kw))


def opt13b_lora(**kw):
    # the traced reference step (docs/memory-model.md): fp16 weights, no autocast
    base = dict(bits=16, dtype="fp16", rank=16, targets="q_proj,v_proj", lora_dropout=0.05, batch_size=1,
                seq_len=512, attn="sdpa", autocast="off")
    base.update(kw)
    return _est(**base)


def test_components_sum_to_total_in_every_phase():
    e = opt13b_lora()
    assert set(e.components) == set(COMPONENTS)
    assert sum(e.components.values()) == e.total_bytes
    assert set(e.phases) == set(PHASES)
    for comps in e.phases.values():
        assert all(v >= 0 for v in comps.values())
    assert e.total_bytes == max(sum(c.values()) for c in e.phases.values())
    assert e.components == e.phases[e.peak_phase]


def test_opt13b_fp16_lora_weights_and_adapter_match_reference_bytes():
    e = opt13b_lora()
    # fp16 base: 12,853,473,280 params x 2 B = 25,706,946,560 B = 24,516.05 MiB
    # (docs/memory-model.md, "Base weights")
    assert e.components["weights"] == OPT13B_PARAMS * 2 == 25_706_946_560
    assert round(e.components["weights"] / MiB, 2) == 24516.05
    # LoRA r=16 on q,v in fp32: 13,107,200 x 4 B = 50 MiB exactly
    # (docs/memory-model.md, "LoRA parameters and gradients")
    assert e.params.trainable == OPT13B_LORA_R16_QV
    assert e.components["lora_params"] == OPT13B_LORA_R16_QV * 4 == 50 * MiB
    # AdamW keeps two fp32 states per LoRA value: 100 MiB (docs/memory-model.md, "Optimizer state")
    assert e.components["optimizer_state"] == 100 * MiB
    assert e.components["quantized_weights"] == e.components["quant_constants"] == 0
    assert e.params.total == OPT13B_PARAMS


def test_opt13b_peak_is_at_backward_start_with_reference_activation_bytes():
    e = opt13b_lora()
    assert e.peak_phase == "backward_start"  # docs/memory-model.md, "Phases": the LoRA peak is at backward start
    assert e.components["gradients"] == 0  # no LoRA gradient exists yet at that moment
    # Per layer and token: 32 B x hidden (docs/memory-model.md, "Activations", per-op attribution: LoRA
    # dropout outputs 2 x fp32 = 8, dropout masks 4 x 1 = 4, ReLU output 4h fp16 = 8, q/k/v/attn-out
    # + 2 LayerNorm inputs 6 x fp16 = 12)
    # = 163,840, plus LayerNorm mean+rstd 2 x 2 x 4 = 16, flash logsumexp 40 heads x 4 = 160 and the two
    # lora_A outputs 2 x 16 x 4 = 128: 164,144 B.
    per_layer_token = 32 * 5120 + 16 + 160 + 128
    assert per_layer_token == 164_144
    tokens = 512
    layers = 40 * per_layer_token * tokens
    # Outside the layers: input_ids + labels (2 x 8 B) and the final LayerNorm input (2 x 5120 + 8 B).
    extras = (16 + 2 * 5120 + 8) * tokens
    assert e.components["activations"] == layers + extras
    # Logits at backward start: fp32 log-softmax + fp32 nll grad + fp32 log-softmax grad = tokens x vocab x 12
    # = 294.56 MiB. A loop that holds the model output also keeps 49 MiB of fp16 logits (docs/memory-model.md,
    # "Logits and loss"); a training loop that keeps only the loss (the HF Trainer) has freed them, and
    # memplan simulate of this setup tracks exactly these three fp32 tensors.
    assert e.components["logits_loss"] == 512 * 50272 * 12
    assert round(e.components["logits_loss"] / MiB, 2) == 294.56


def test_opt13b_gradient_checkpointing_keeps_layer_inputs_only():
    e = opt13b_lora(grad_ckpt=True)
    # 40 layer inputs x 512 tokens x 5120 x 2 B = 200 MiB, plus the same extras as without checkpointing.
    assert e.components["activations"] == 40 * 512 * 5120 * 2 + (16 + 2 * 5120 + 8) * 512
    assert e.peak_phase == "backward_start"
    # memplan simulate of this setup with GC: activations + logits_loss = 210.01 + 294.56 = 504.57 MiB
    # (python benchmarks/memory_facts.py, section D; docs/memory-model.md, "Activations"). The estimate leaves
    # out the 5 MiB embedding output that enable_input_require_grads keeps alive (ibid.).
    act = (e.components["activations"] + e.components["logits_loss"]) / MiB
    assert abs(act - 504.57) / 504.57 < 0.02


def test_qlora_nf4_double_quant_constants_per_layer():
    # One 5120 x 5120 projection: n = 26,214,400 values; packed n/2 = 13,107,200 B; 409,600 blocks of 64.
    # Double quant: uint8 absmax 409,600 B; ceil(409,600 / 256) = 1,600 fp32 = 6,400 B -> 6,656 B after
    # 512-B rounding; 256-entry fp32 code 1,024 B; fp32 offset -> 512 B; the 16-entry code 64 B -> 512 B.
    e = _est(method="qlora", rank=16, targets="q_proj,v_proj", seq_len=512)
    n_linear = 40 * 6  # q, k, v, out_proj, fc1, fc2 per layer; lm_head (tied) stays in float
    q_consts = 512 + 409_600 + 6_656 + 1_024 + 512
    fc_consts = 512 + 1_638_400 + round_up(ceil_div(1_638_400, 256) * 4) + 1_024 + 512
    assert e.components["quant_constants"] == 40 * (4 * q_consts + 2 * fc_consts)
    # packed 4-bit weights: half a byte per quantized value
    assert e.components["quantized_weights"] == (40 * (4 * 5120 * 5120 + 2 * 5120 * 20480)) // 2
    assert e.params.quantized == 40 * (4 * 5120 * 5120 + 2 * 5120 * 20480)
    assert n_linear == 240
    # Double quant brings the constants to ~0.0159 B/param (docs/memory-model.md, "Quantized weights":
    # 0.5161 vs 0.5625 B/param).
    per_param = (e.components["quantized_weights"] + e.components["quant_constants"]) / e.params.quantized
    assert 0.5159 < per_param < 0.5162


def ceil_div(a, b):
    return -(-a // b)


def round_up(n, m=512):
    return ceil_div(n, m) * m


def test_nf4_without_double_quant_is_0_5625_bytes_per_param():
    e = _est(method="qlora", double_quant=False)
    per_param = (e.components["quantized_weights"] + e.components["quant_constants"]) / e.params.quantized
    assert abs(per_param - 0.5625) < 1e-4  # 0.5 + 4/64 (docs/memory-model.md, "Quantized weights")


def test_kbit_upcast_puts_the_float_rest_in_fp32():
    spec = load_model("opt-13b")
    rest = spec.total_params() - 40 * (4 * 5120 * 5120 + 2 * 5120 * 20480)
    # embeddings (50272 x 5120) + positions (2050 x 5120) + norms + biases, fp32 after
    # prepare_model_for_kbit_training: the fp32 embedding alone is 982 MiB (docs/memory-model.md,
    # "Quantized weights").
    assert _est(method="qlora").components["weights"] == rest * 4
    assert _est(method="qlora", upcast_non_quantized=False, dtype="bf16").components["weights"] == rest * 2
    assert round(50272 * 5120 * 4 / MiB) == 982


def test_int8_weights_and_row_scales():
    e = _est(bits=8)
    quantized = 40 * (4 * 5120 * 5120 + 2 * 5120 * 20480)
    assert e.components["quantized_weights"] == quantized  # one byte per value (CB)
    # SCB: one fp32 per output row: q,k,v,out 5120 rows each, fc1 20480, fc2 5120 -> per layer
    # 4 x 20,480 B + 81,920 B + 20,480 B, all multiples of 512.
    assert e.components["quant_constants"] == 40 * (4 * 5120 * 4 + 20480 * 4 + 5120 * 4)
    assert any("int8" in n for n in e.notes)


@pytest.mark.parametrize(
    "optimizer, expected_state_bytes",
    [
        ("sgd", 0),
        ("sgd_momentum", OPT13B_LORA_R16_QV * 4),  # momentum_buffer, fp32 like the adapters
        ("rmsprop", OPT13B_LORA_R16_QV * 4),  # square_avg
        ("adamw_torch", 2 * OPT13B_LORA_R16_QV * 4),  # exp_avg + exp_avg_sq
        ("paged_adamw_32bit", 2 * OPT13B_LORA_R16_QV * 4),  # bnb 32-bit state is fp32
        # bnb 8-bit: per tensor n values -> n uint8 + ceil(n/256) fp32 absmax, two states. Every LoRA tensor
        # here is 16 x 5120 = 81,920 values (>= 4096, so 8-bit): 81,920 + 320 x 4 = 83,200 B per state.
        ("adamw_bnb_8bit", 40 * 2 * 2 * 2 * 83_200),
        ("paged_adamw_8bit", 40 * 2 * 2 * 2 * 83_200),
    ],
)
def test_optimizer_state_bytes(optimizer, expected_state_bytes):
    e = opt13b_lora(optimizer=optimizer)
    assert e.components["optimizer_state"] == expected_state_bytes
    # bnb pages only tensors of >= 1e5 values: LoRA r=16 tensors here hold 81,920, so nothing is paged.
    assert e.paged_bytes == 0


def test_adafactor_factored_state():
    # Adafactor keeps a row and a column vector per matrix: lora_A (16 x 5120) -> 16 + 5120 values,
    # lora_B (5120 x 16) -> 5120 + 16; 80 modules, fp32 (4 B).
    e = opt13b_lora(optimizer="adafactor")
    assert e.components["optimizer_state"] == 80 * 2 * (16 + 5120) * 4


def test_foreach_adamw_step_temporary_in_full_fine_tuning():
    # Full fine-tuning in bf16: weights, gradients 2 B each, AdamW 2 states x 2 B, foreach sqrt temp 2 B.
    e = _est(model="opt-125m", method="full", batch_size=1, seq_len=128)
    p = e.params.total
    assert e.params.trainable == p
    step = e.phases["optimizer_step"]
    assert step["gradients"] == 2 * p and step["optimizer_state"] == 4 * p
    assert step["transients"] >= 2 * p
    fused = _est(model="opt-125m", method="full", batch_size=1, seq_len=128, optimizer="adamw_torch_fused")
    assert fused.phases["optimizer_step"]["transients"] == step["transients"] - 2 * p


def test_memory_grows_with_batch_seq_and_rank():
    small = opt13b_lora()
    assert opt13b_lora(batch_size=2).total_bytes > small.total_bytes
    assert opt13b_lora(seq_len=1024).total_bytes > small.total_bytes
    assert opt13b_lora(rank=64).total_bytes > small.total_bytes
    assert opt13b_lora(targets="all-linear").total_bytes > small.total_bytes
    assert opt13b_lora(grad_ckpt=True).total_bytes < small.total_bytes


def test_eager_attention_keeps_quadratic_scores():
    sdpa = _est(model="llama-2-7b", seq_len=2048, attn="sdpa")
    eager = _est(model="llama-2-7b", seq_len=2048, attn="eager")
    # Per layer and token, eager saves heads x seq x (fp32 softmax 4 + bf16 copy 2) = 32 x 2048 x 6, but not
    # SDPA's output (bf16, 4096 wide) nor its fp32 logsumexp (32 heads x 4 B); q, k, v are saved by both
    # (Llama-2-7B has no GQA, so repeat_kv copies nothing).
    extra = eager.components["activations"] - sdpa.components["activations"]
    assert extra == 32 * 2048 * (32 * 2048 * 6 - (2 * 4096 + 4 * 32))
    assert any("eager" in n for n in eager.notes)


def test_gpu_context_and_bf16_default():
    e = estimate(TrainSetup("opt-1.3b"), gpu="3090")
    g = load_gpu("3090")
    assert e.components["cuda_context"] == g.cuda_context_bytes
    assert e.setup.dtype == "bf16" and e.setup.gpu == g.id
    assert estimate(TrainSetup("opt-1.3b"), gpu="t4").setup.dtype == "fp16"  # Turing: no bf16


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(method="qlora", bits=8), "qlora"),
        (dict(method="full", bits=4), "full fine-tuning"),
        (dict(bits=16, dtype="fp32"), "bits 32"),
        (dict(rank=0), "rank"),
        (dict(batch_size=-1), "batch size"),
        (dict(seq_len=0), "sequence length"),
        (dict(seq_len=4096), "max_position_embeddings"),  # OPT's learned positions stop at 2048
        (dict(lora_dropout=1.0), "dropout"),
        (dict(optimizer="adamw_fancy"), "unknown optimizer"),
        (dict(targets="w_proj"), "w_proj"),
        (dict(attn="flash_attention_2", bits=32), "fp16/bf16"),
    ],
)
def test_invalid_setups_are_rejected_with_the_value(kw, match):
    with pytest.raises(InvalidSetupError, match=match):
        _est(**kw)


def test_bf16_on_a_card_without_bf16_is_rejected():
    with pytest.raises(InvalidSetupError, match="bf16"):
        estimate(TrainSetup("opt-1.3b", dtype="bf16"), gpu="t4")


def test_to_dict_shape():
    d = opt13b_lora().to_dict()
    assert {"total_bytes", "components", "params", "peak_phase", "setup"} <= set(d)
    assert d["params"]["total"] == OPT13B_PARAMS and d["params"]["trainable"] == OPT13B_LORA_R16_QV
    assert d["setup"]["targets"] == "q_proj,v_proj" and d["setup"]["bits"] == 16


@pytest.mark.parametrize("model", ["llama-3.1-8b", "mixtral-8x7b", "gemma-2-2b", "phi-2", "falcon-7b", "gpt2",
                                   "bloom-560m", "bert-large-uncased", "santacoder", "qwen2.5-7b",
                                   "stablelm-3b-4e1t", "phi-3-mini"])
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_every_architecture_estimates(model, bits):
    spec = load_model(model)
    for ckpt in (False, True):
        # LoRA dropout 0: peft refuses dropout on Mixtral's parameter-wrapped experts (tested below).
        setup = resolve_setup(TrainSetup(model, bits=bits, grad_ckpt=ckpt, targets="all-linear", lora_dropout=0.0),
                              spec)
        e = estimate_for(spec, setup)
        assert e.total_bytes == sum(e.components.values()) > 0
        assert e.params.trainable > 0


def test_mixtral_expert_lora_refuses_dropout_like_peft():
    # peft 0.21 lora.ParamWrapper: "does not work with lora_dropout != 0" (peft/tuners/lora/layer.py).
    with pytest.raises(InvalidSetupError, match="lora-dropout 0"):
        _est(model="mixtral-8x7b", targets="all-linear", lora_dropout=0.05)
    assert _est(model="mixtral-8x7b", targets="all-linear", lora_dropout=0.0).params.trainable > 0


def test_transformers5_leaves_mixtral_experts_and_falcon_unquantized():
    # transformers 5.23 + bitsandbytes quantize only exact nn.Linear / Conv1D modules: Mixtral's fused 3-D
    # experts and Falcon's FalconLinear stay in float (verified by loading tiny models in 4 bits on CPU,
    # tests/test_models.py). With the kbit upcast that float rest is fp32.
    mixtral = _est(model="mixtral-8x7b", bits=4, lora_dropout=0.0)
    assert mixtral.params.quantized < 0.05 * mixtral.params.total
    falcon = _est(model="falcon-7b", bits=4)
    assert falcon.params.quantized == 0 and falcon.components["quantized_weights"] == 0
    assert falcon.components["weights"] == falcon.params.total * 4


def test_lora_on_a_tied_lm_head_saves_its_input():
    # GPT-2's lm_head is tied to wte; an adapter on it saves lora_A's fp32 input (768 wide) and its r-wide
    # output per token: (768 + 8) x 4 B, plus the dropout mask (768 B); under autocast both are bf16 casts, and
    # the two factors' bf16 casts (8 x (768 + 50257)) are saved too.
    with_head = _est(model="gpt2", targets="c_attn,lm_head", seq_len=128, autocast="off")
    without = _est(model="gpt2", targets="c_attn", seq_len=128, autocast="off")
    assert with_head.components["activations"] - without.components["activations"] == 128 * ((768 + 8) * 4 + 768)
    with_head = _est(model="gpt2", targets="c_attn,lm_head", seq_len=128, autocast="bf16")
    without = _est(model="gpt2", targets="c_attn", seq_len=128, autocast="bf16")
    assert with_head.components["activations"] - without.components["activations"] == \
        128 * ((768 + 8) * 2 + 768) + 8 * (768 + 50257) * 2


def test_tensor_level_estimate_leaves_out_runtime_terms():
    spec = load_model("opt-13b")
    setup = resolve_setup(TrainSetup("opt-13b", rank=16, targets="q_proj,v_proj"), spec)
    full, tensors = estimate_for(spec, setup), estimate_for(spec, setup, include_runtime=False)
    from memplan.plan.estimate import CUBLAS_WORKSPACE_BYTES

    assert tensors.components["cuda_context"] == tensors.components["allocator_overhead"] == 0
    assert full.total_bytes - tensors.total_bytes == (full.components["cuda_context"]
                                                      + full.components["allocator_overhead"] + CUBLAS_WORKSPACE_BYTES)


def test_paged_optimizers_page_only_large_tensors():
    # r=64: lora_A 64 x 5120 = 327,680 values (>= 1e5, paged). 8-bit AdamW: 2 x (327,680 + 1,280 x 4) B per
    # tensor; 80 modules x 2 tensors.
    e = opt13b_lora(rank=64, optimizer="paged_adamw_8bit")
    assert e.paged_bytes == e.components["optimizer_state"] == 80 * 2 * 2 * (327_680 + 1_280 * 4)


# ---- a sliding window under SDPA (issue 13) ----------------------------------------------------------------

def _mistral(seq_len, **knobs):
    from memplan.plan.activations import attention_kernel

    spec = load_model("mistral-7b-v0.1")
    setup = resolve_setup(TrainSetup("mistral-7b-v0.1", seq_len=seq_len, grad_ckpt=True, **knobs), spec)
    return estimate_for(spec, setup, include_runtime=False), attention_kernel(spec, setup)


def test_at_the_sliding_window_sdpa_gets_a_mask_and_the_memory_efficient_kernel():
    """transformers builds an explicit mask once the sequence reaches Mistral's 4,096-token window: the
    memory-efficient kernel then saves q, repeated k/v, the output and the additive mask, never S x S
    probabilities. memplan simulate (CUDA semantics) on the issue's setup: 13,736 MiB at 4,095 tokens (math
    kernel), 9,345 MiB at 4,096 (efficient); the estimate was 15,845 MiB at 4,096 (+70%)."""
    qlora = dict(method="qlora", bits=4, rank=16, targets="all-linear", optimizer="paged_adamw_32bit",
                 autocast="off")
    below, below_kernel = _mistral(4095, **qlora)
    at, at_kernel = _mistral(4096, **qlora)
    assert (below_kernel, at_kernel) == ("math", "flash")
    assert at.total_bytes / (9345 * MiB) == pytest.approx(1.0, abs=0.05)
    assert at.total_bytes < below.total_bytes
    assert any("less memory than one just below the window" in n for n in at.notes)
    assert not any("sliding window" in n for n in below.notes)
    # bf16 (no upcast): flash below the window with native GQA; at it, repeated k/v and the mask cost more
    bf16_below, k1 = _mistral(4095, rank=16, autocast="off")
    bf16_at, k2 = _mistral(4096, rank=16, autocast="off")
    assert (k1, k2) == ("flash", "flash") and bf16_at.total_bytes > bf16_below.total_bytes
    assert any("sliding window" in n for n in bf16_at.notes)
    assert not any("less memory" in n for n in bf16_at.notes)


def test_longest_sequence_looks_past_the_window():
    """Memory falls at the window (above), so the longest sequence that fits is searched on each side of it: a
    12 GiB budget holds 4,096+ tokens of this QLoRA plan but not 4,095."""
    from memplan.plan.search import fit

    setup = TrainSetup("mistral-7b-v0.1", method="qlora", bits=4, rank=16, targets="all-linear", grad_ckpt=True,
                       optimizer="paged_adamw_32bit")
    r = fit(setup, "12GiB", pinned=frozenset({"method", "bits", "rank", "targets", "batch_size", "grad_ckpt",
                                              "optimizer"}))
    assert r.max_seq_len_batch1 > 4096
