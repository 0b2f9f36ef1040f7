"""``RULES``: every version-dependent behaviour memplan models, each with its version range, what it changes, a
citation (a file and line at a release, read from that release's wheel) and what memplan does with it. The rules
that change a number are applied by ``memplan.plan.stack_effects`` (and ``attention.repeats_kv``,
``trainable.gradients_held``); the others say why they change none. docs/memory-model.md, "Library versions", is
the same table in prose."""

from __future__ import annotations

from dataclasses import dataclass

from .stack import Stack, parse_version

__all__ = ["Rule", "RULES", "WIRED", "NO_EFFECT", "rule", "applies"]

@dataclass(frozen=True)
class Rule:
    """A behaviour of one package that holds for ``since <= version < until`` (None: open end)."""

    name: str
    package: str
    since: str | None
    until: str | None
    effect: str  # what the library does in that range (and what it does outside it)
    citation: str  # files and lines at releases (read from those releases' wheels)
    memplan: str  # how the estimator uses it, or why it changes none of memplan's terms
    model_types: tuple[str, ...] = ()  # limited to these architectures (empty: all)

    @property
    def range_text(self) -> str:
        lo = f"{self.since} <= " if self.since else ""
        hi = f" < {self.until}" if self.until else ""
        return f"{lo}{self.package}{hi}" if (lo or hi) else f"every modelled {self.package}"

    def applies(self, stack: Stack, model_type: str | None = None) -> bool:
        if self.model_types and model_type is not None and model_type not in self.model_types:
            return False
        v = stack.release(self.package)
        if self.since is not None and v < parse_version(self.since):
            return False
        return self.until is None or v < parse_version(self.until)


_LLAMA_FAMILY = ("llama", "mistral", "mixtral", "qwen2", "gemma2", "phi", "phi3")
_OWN_LOSS_FAMILY = ("opt", "gpt2", "falcon", "bloom", "stablelm", "gpt_bigcode")
WIRED = "changes memplan's numbers: "
NO_EFFECT = "no effect on memplan's terms: "

RULES: tuple[Rule, ...] = (
    Rule("moe-experts-as-linears", "transformers", None, "5.0.0",
         "Mixtral's experts are one MixtralBlockSparseTop2MLP per expert with nn.Linear w1, w2, w3, and the router "
         "an nn.Linear gate: bitsandbytes quantizes all of them, and peft targets w1/w2/w3/gate by module name as "
         "ordinary LoRA layers (any lora_dropout). From 5.0 the experts are fused 3-D nn.Parameters "
         "(experts.gate_up_proj, experts.down_proj) and the router a bare parameter: bitsandbytes leaves them in "
         "the compute dtype, prepare_model_for_kbit_training upcasts them to fp32, and peft adapts them through "
         "target_parameters (lora_dropout 0)",
         "transformers 4.48.3 models/mixtral/modeling_mixtral.py:67-81 (w1, w2, w3 at 73-75), 105 (gate), 107 "
         "(experts); 5.0.0 models/mixtral/modeling_mixtral.py:63-72 (gate_up_proj, down_proj at 71-72), 102-108 "
         "(MixtralTopKRouter)",
         WIRED + "the model's layout (memplan.catalog.models.layouts.moe_as_linears): quantized weights, LoRA "
         "tensors, autocast weight copies", ("mixtral",)),
    Rule("bnb-quantizes-linear-subclasses", "transformers", None, "5.5.0",
         "replace_with_bnb_linear swaps every isinstance(module, (nn.Linear, Conv1D)): subclasses such as Falcon's "
         "FalconLinear are quantized. From 5.5 it swaps Conv1D and exact nn.Linear only (type(module) is "
         "nn.Linear), so FalconLinear stays in float",
         "transformers 4.48.3 integrations/bitsandbytes.py:168; 5.4.0 integrations/bitsandbytes.py:184 "
         "(isinstance); 5.5.0 integrations/bitsandbytes.py:184 (type(module) is nn.Linear)",
         WIRED + "which linears are quantized (memplan.catalog.models.layouts.quantize_linear_subclasses)",
         ("falcon",)),
    Rule("logits-fp32-in-forward", "transformers", None, "4.46.0",
         "the CausalLM forward upcasts the logits itself (logits = logits.float()) and takes CrossEntropyLoss of "
         "logits[..., :-1, :].contiguous(): the 16-bit lm_head output dies at the upcast, and the fp32 logits, "
         "their fp32 shifted copy and the fp32 log-softmax are alive together, 12 B per token x vocab in forward "
         "(from 4.49: the 16-bit logits, one fp32 copy and the log-softmax)",
         "transformers 4.44.2 models/llama/modeling_llama.py:1209; 4.45.2 models/llama/modeling_llama.py:1214-1221; "
         "4.46.3 models/llama/modeling_llama.py:1214 (self.loss_function)",
         WIRED + "logits_loss at forward_end (memplan.plan.stack_effects.logits_bytes)", _LLAMA_FAMILY),
    Rule("mistral-logits-fp32-in-forward", "transformers", None, "4.48.0",
         "MistralForCausalLM keeps its own loss two releases longer: 4.46-4.47 upcast the logits in forward when "
         "labels are given (logits = logits.float(), the 16-bit output dies) and shift a contiguous fp32 copy, "
         "the tensors of logits-fp32-in-forward; from 4.48 it calls ForCausalLMLoss",
         "transformers 4.47.1 models/mistral/modeling_mistral.py:1090-1092; 4.48.3 "
         "models/mistral/modeling_mistral.py:855 (self.loss_function)",
         WIRED + "logits_loss at forward_end (memplan.plan.stack_effects.logits_bytes)", ("mistral",)),
    Rule("loss-in-logits-dtype", "transformers", None, "4.48.0",
         "OPT, GPT-2, Falcon, BLOOM, StableLM and GPTBigCode compute CrossEntropyLoss in their forward on "
         "logits[..., :-1, :].contiguous() without an upcast: the shifted copy, the log-softmax and both loss "
         "gradients are in the logits' dtype (3 x 2 B per token x vocab in 16 bits instead of 10 and 12); under "
         "autocast log_softmax runs in fp32 (autocast's fp32 list). From 4.48 they call ForCausalLMLoss",
         "transformers 4.47.1 models/opt/modeling_opt.py:1189-1199; 4.48.3 models/opt/modeling_opt.py:1195 "
         "(self.loss_function)",
         WIRED + "logits_loss at forward_end and backward_start (memplan.plan.stack_effects.logits_bytes)",
         _OWN_LOSS_FAMILY),
    Rule("causal-lm-loss-shift-copy", "transformers", "4.46.0", "4.49.0",
         "ForCausalLMLoss upcasts the logits (logits.float()) and shifts them with logits[..., :-1, :].contiguous(): "
         "one more fp32 token x vocab copy alive in forward than from 4.49, which pads the labels "
         "(nn.functional.pad(labels, (0, 1))) and leaves the logits unshifted",
         "transformers 4.48.3 loss/loss_utils.py:32-39; 4.49.0 loss/loss_utils.py:36-39; 5.23.0 "
         "loss/loss_utils.py:61-65",
         WIRED + "logits_loss at forward_end (memplan.plan.stack_effects.logits_bytes)"),
    Rule("sdpa-repeats-kv", "transformers", None, "4.54.0",
         "sdpa_attention_forward repeats grouped-query k/v to every head (repeat_kv, a copy) before calling SDPA; "
         "from 4.54 it passes enable_gqa=True instead when there is no mask and torch >= 2.5 (use_gqa_in_sdpa). "
         "With repeated k/v, SDPA saves head-sized k and v, and an fp32 stream (QLoRA) takes the memory-efficient "
         "kernel instead of the math kernel's seq x seq probabilities",
         "transformers 4.53.3 integrations/sdpa_attention.py:41-42; 4.54.1 integrations/sdpa_attention.py:27, "
         "54-57",
         WIRED + "attention activations of grouped-query models (memplan.plan.attention.repeats_kv)"),
    Rule("sdpa-support", "transformers", None, None,
         "which architectures transformers runs with SDPA (the model class's _supports_sdpa): OPT from 4.46, GPT-2 "
         "from 4.42, BERT from 4.41, Phi and StableLM from 4.39, Phi-3 from 4.45, Mistral and Mixtral from 4.37, "
         "Gemma-2 from 4.42 until 5.21 (dropped: SDPA ignores softcapping), BLOOM never; without it "
         "attn_implementation='sdpa' raises and the default is eager attention",
         "transformers 4.45.2 / 4.46.3 models/opt/modeling_opt.py:604; 4.41.2 / 4.42.4 models/gpt2/modeling_gpt2.py"
         ":783; 4.40.2 / 4.41.2 models/bert/modeling_bert.py:829; 4.44.2 / 4.45.2 models/phi3/modeling_phi3.py:846; "
         "5.20.0 / 5.21.0 models/gemma2/modeling_gemma2.py:352 (attention.SDPA_RELEASES)",
         WIRED + "attn=auto resolves to eager where SDPA is missing, and sdpa is refused there "
         "(memplan.plan.setup.default_attention); memplan keeps Gemma-2 on eager by default on every stack"),
    Rule("checkpointing-reentrant", "transformers", None, "5.0.0",
         "gradient_checkpointing_enable() defaults to use_reentrant=True; 5.0 defaults to use_reentrant=False",
         "transformers 4.48.3 modeling_utils.py:2539; 5.0.0 modeling_utils.py:3099",
         NO_EFFECT + "both keep each layer's input tensor (the same storage) and recompute one layer at a time; "
         "memplan simulate on transformers 4.48.3 (profiles/stacks/old_stack_checks.csv) matches the estimate "
         "with checkpointing as on 5.24"),
    Rule("kbit-prepare-casts", "peft", None, None,
         "prepare_model_for_kbit_training freezes the model, casts every fp16/bf16 parameter to fp32 and defaults "
         "use_gradient_checkpointing=True (with enable_input_require_grads unless use_reentrant=False is passed). "
         "Before 0.10 the cast also took a Params4bit stored in a float quant_storage (FSDP-QLoRA's bf16 "
         "storage); from 0.10 it skips Params4bit",
         "peft 0.7.1 utils/other.py:72, 103; 0.10.0 utils/other.py:75, 108-109; 0.21.2 utils/other.py:158-159, "
         "208-209",
         NO_EFFECT + "memplan stores 4-bit weights in uint8 (bitsandbytes' default quant_storage), which no "
         "version casts, except under ZeRO-3 (bf16 storage, as peft's DeepSpeed guide loads them), where "
         "DeepSpeed's bf16 engine casts every float parameter back to bf16; the upcast and the checkpointing "
         "default are the same in every modelled peft"),
    Rule("adapters-in-base-dtype", "peft", None, "0.12.0",
         "LoRA weights are moved to the base layer's float dtype (self.to(weight.device, dtype=weight.dtype)): "
         "fp16/bf16 adapters on 16-bit layers, fp32 on 4/8-bit ones (the packed weight is not a float). From 0.12 "
         "get_peft_model(autocast_adapter_dtype=True) keeps them in fp32",
         "peft 0.11.1 tuners/tuners_utils.py:128-131; 0.12.0 mapping.py:138, tuners/tuners_utils.py:316 "
         "(_cast_adapter_dtype)",
         WIRED + "the default adapter dtype (memplan.plan.stack_effects.default_adapter_dtype): LoRA parameters, "
         "their gradients and optimizer state, the adapters' saved inputs"),
    Rule("int8-saves-transposed-input", "bitsandbytes", None, "0.45.0",
         "MatMul8bitLt quantizes its input with double_quant and saves (CAt, subA, A): an int8 transposed copy "
         "of each int8 layer's input (1 B per token per input feature, one per layer even where q/k/v share the "
         "input) besides the input. From 0.45 a frozen weight takes int8_vectorwise_quant and saves A (and the "
         "outlier columns) only",
         "bitsandbytes 0.44.1 autograd/_functions.py:321, 425; 0.45.2 autograd/_functions.py:321-326, 389",
         WIRED + "activations at 8 bits (memplan.plan.stack_effects.int8_input_copies_per_token)"),
    Rule("matmul4bit-saves-input", "bitsandbytes", None, "0.43.0",
         "MatMul4Bit saves (A, B): every 4-bit layer keeps its compute-dtype input for backward -- its own cast "
         "where Linear4bit's input is in another dtype (QLoRA's fp32 stream), else the input itself; from 0.43 it "
         "saves (None, B)",
         "bitsandbytes 0.41.3 autograd/_functions.py:523; 0.42.0 autograd/_functions.py:523; 0.43.3 "
         "autograd/_functions.py:516",
         WIRED + "activations at 4 bits (memplan.plan.stack_effects.matmul4bit_inputs_per_token)"),
    Rule("linear4bit-output-dtype", "bitsandbytes", None, None,
         "Linear4bit casts its input to the compute dtype and returns the output cast back to the input's dtype "
         "(.to(inp_dtype)), so 4-bit projections keep the residual stream's dtype",
         "bitsandbytes 0.43.3 nn/modules.py:474-479; 0.49.2 nn/modules.py:551-556; 0.50.2 nn/modules.py:628-637",
         NO_EFFECT + "the same in every modelled bitsandbytes (memplan.plan.activations.residual_bytes)"),
    Rule("linear4bit-bias-stays-input-dtype", "bitsandbytes", None, "0.50.0",
         "Linear4bit casts its bias in place to the input's dtype before casting the input (an fp32 bias after "
         "the k-bit upcast stays fp32); 0.50 casts it in place to the compute dtype",
         "bitsandbytes 0.49.2 nn/modules.py:543 (before the input cast at 551); 0.50.2 nn/modules.py:628-634",
         NO_EFFECT + "memplan counts the biases at the float weights' bytes: exact before 0.50, 2 B per 4-bit "
         "bias value high from 0.50 (docs/memory-model.md, the fp32 upcast)"),
    Rule("sdpa-native-gqa", "torch", "2.5.0", None,
         "scaled_dot_product_attention takes enable_gqa (grouped-query k/v without repeating them); on CUDA only "
         "the flash kernel supports it (check_batch_size_and_num_heads_dense<supports_gqa>). transformers 4.54 to "
         "5.13 pass it only with torch >= 2.5, and repeat k/v otherwise",
         "torch 2.4.1 include/ATen/native/transformers/sdp_utils_cpp.h (no enable_gqa); 2.5.1 sdp_utils_cpp.h:51, "
         "419; 2.13.0 sdp_utils_cpp.h:45, 431; transformers 4.57.6 integrations/sdpa_attention.py:12, 45",
         WIRED + "with sdpa-repeats-kv: whether grouped-query k/v are repeated (memplan.plan.attention.repeats_kv)"),
    Rule("zero-grad-keeps-buffers", "torch", None, "2.0.0",
         "nn.Module.zero_grad() and Optimizer.zero_grad() default to set_to_none=False: the Trainer's "
         "model.zero_grad() after each optimizer step fills the gradients with zeros and keeps them, so every step "
         "after the first runs forward and backward with all gradients allocated (new ones are added in place). "
         "From 2.0 both default to set_to_none=True",
         "torch 1.13.1 nn/modules/module.py:1956, optim/optimizer.py:246; 2.1.2 nn/modules/module.py:2443, "
         "optim/optimizer.py:777; transformers 4.26.1 trainer.py:1718, 1863 (model.zero_grad())",
         WIRED + "gradients held through forward and backward (memplan.plan.trainable.gradients_held): a full "
         "gradient copy at the peak of full fine-tuning"),
    Rule("optimizer-foreach-default", "torch", None, "2.0.0",
         "torch.optim's Adam/AdamW (and the other foreach-capable optimizers) default to foreach=False: the step "
         "loops over the parameters, so its temporaries are one parameter's at a time; from 2.0 "
         "_default_to_fused_or_foreach turns foreach on for CUDA tensors, and a step's temporaries cover every "
         "parameter at once",
         "torch 1.13.1 optim/adamw.py:207-209, optim/adam.py:286-288 (foreach = False); 2.1.2 optim/adamw.py:314, "
         "optim/optimizer.py:109-126",
         WIRED + "optimizer-step transients (memplan.plan.stack_effects.optimizer_loops_per_tensor)"),
    Rule("sdpa-flash-needs-no-mask", "torch", None, None,
         "the flash kernel refuses an explicit attn_mask and non-half inputs; the memory-efficient kernel takes "
         "fp32 and masks; otherwise the math kernel runs",
         "torch 2.4.1 sdp_utils_cpp.h:266; 2.5.1 sdp_utils_cpp.h:268; 2.13.0 sdp_utils_cpp.h:260 "
         "(check_for_attn_mask)",
         NO_EFFECT + "the same in every modelled torch as far as the shipped header shows (the head-dim and "
         "architecture checks in cuda/sdp_utils.cpp are not in the wheels and were not read at older releases)"),
)


def rule(name: str) -> Rule:
    for r in RULES:
        if r.name == name:
            return r
    raise KeyError(name)


def applies(name: str, stack: Stack, model_type: str | None = None) -> bool:
    """Whether the rule ``name`` holds on ``stack`` (for ``model_type``, where the rule is per architecture)."""
    return rule(name).applies(stack, model_type)
