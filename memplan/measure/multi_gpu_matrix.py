"""The validation matrix's multi-GPU rows (issue "Beyond one card"): one rank of DDP and FSDP2 (full, grad-op and
hybrid sharding, FSDP+QLoRA) at real widths, simulated by the real engines under torch's fake process group
(memplan.measure.dist_sim), and one rank of DeepSpeed ZeRO-1/2/3 (memplan.measure.zero_sim).

Each row is a catalog model with the grid's base knobs (LoRA r=8 on the default targets, bf16 weights, no
autocast, batch 1 x 512, sdpa, AdamW, no checkpointing) and the knobs shown. FSDP1 cannot run on fake tensors
(dist_sim says why); DeepSpeed ZeRO runs there with four patches (memplan.measure.zero_sim), and
``benchmarks/zero_gloo.py`` checks the ZeRO state with real gloo processes (reports/multi_gpu_gloo.csv).
"""

from __future__ import annotations

__all__ = ["MATRIX_MULTI_GPU", "MULTI_GPU_KEY_DEFAULTS", "MULTI_GPU_KEYS"]

# The setup columns several GPUs add to validation_matrix.csv, with the value a row written before them had.
MULTI_GPU_KEY_DEFAULTS = {"gpus": 1, "nodes": 1, "strategy": "single", "fsdp_sharding": None, "offload": "none"}
MULTI_GPU_KEYS = tuple(MULTI_GPU_KEY_DEFAULTS)

_Q = {"method": "qlora", "bits": 4, "grad_ckpt": True}  # QLoRA as prepare_model_for_kbit_training runs it
_FULL = {"method": "full"}
_DDP, _FSDP = {"strategy": "ddp"}, {"strategy": "fsdp2"}
_GRAD_OP = {"strategy": "fsdp2", "fsdp_sharding": "grad-op"}
_HYBRID = {"strategy": "fsdp2", "fsdp_sharding": "hybrid"}
_Z1, _Z2, _Z3 = {"strategy": "zero1"}, {"strategy": "zero2"}, {"strategy": "zero3"}

MATRIX_MULTI_GPU: tuple[tuple[str, dict], ...] = (
    # DDP: a replica and gradient buckets
    ("llama-2-7b-hf", {**_DDP, "gpus": 2}),
    ("llama-2-7b-hf", {**_DDP, "gpus": 4, "batch_size": 4}),
    ("llama-2-7b-hf", {**_DDP, "gpus": 8, "targets": "all-linear", "rank": 16}),
    ("llama-2-7b-hf", {**_DDP, "gpus": 2, **_Q}),
    ("llama-2-7b-hf", {**_DDP, "gpus": 4, "targets": "all-linear", "rank": 16, **_Q}),
    ("llama-3.1-8b", {**_DDP, "gpus": 2, "autocast": "bf16"}),
    ("mistral-7b-v0.1", {**_DDP, "gpus": 4, "batch_size": 2, "seq_len": 1024, **_Q, "autocast": "bf16"}),
    ("qwen2.5-1.5b", {**_DDP, "gpus": 2, **_FULL, "batch_size": 2}),
    ("opt-1.3b", {**_DDP, "gpus": 8, **_FULL}),
    ("gemma-2-2b", {**_DDP, "gpus": 2}),
    # FSDP2, full shard
    ("llama-2-7b-hf", {**_FSDP, "gpus": 2}),
    ("llama-2-7b-hf", {**_FSDP, "gpus": 4}),
    ("llama-2-7b-hf", {**_FSDP, "gpus": 8}),
    ("llama-2-7b-hf", {**_FSDP, "gpus": 4, "batch_size": 4, "seq_len": 1024}),
    ("llama-2-7b-hf", {**_FSDP, "gpus": 8, "grad_ckpt": True, "batch_size": 8}),
    ("llama-2-7b-hf", {**_FSDP, "gpus": 2, "targets": "all-linear", "rank": 64}),
    ("llama-2-7b-hf", {**_FSDP, "gpus": 2, "autocast": "bf16", "grad_ckpt": True}),
    ("llama-2-7b-hf", {**_FSDP, "gpus": 2, **_FULL}),
    ("llama-2-7b-hf", {**_FSDP, "gpus": 8, **_FULL}),
    ("llama-2-7b-hf", {**_FSDP, "gpus": 4, **_FULL, "grad_ckpt": True, "batch_size": 2}),
    ("llama-3.1-8b", {**_FSDP, "gpus": 8, "autocast": "bf16", "batch_size": 2, "seq_len": 2048,
                      "grad_ckpt": True}),
    ("mistral-7b-v0.1", {**_FSDP, "gpus": 4}),
    ("qwen2.5-1.5b", {**_FSDP, "gpus": 4, **_FULL}),
    ("qwen2.5-1.5b", {**_FSDP, "gpus": 2, "batch_size": 4}),
    ("gemma-2-2b", {**_FSDP, "gpus": 4}),
    ("opt-13b", {**_FSDP, "gpus": 4, "grad_ckpt": True}),
    ("phi-2", {**_FSDP, "gpus": 2, "batch_size": 2}),
    ("falcon-7b", {**_FSDP, "gpus": 4}),
    ("llama-2-70b-hf", {**_FSDP, "gpus": 8, "grad_ckpt": True}),
    # FSDP2, grad-op (SHARD_GRAD_OP)
    ("llama-2-7b-hf", {**_GRAD_OP, "gpus": 2}),
    ("llama-2-7b-hf", {**_GRAD_OP, "gpus": 4, "batch_size": 2}),
    ("llama-2-7b-hf", {**_GRAD_OP, "gpus": 8, "grad_ckpt": True}),
    ("llama-2-7b-hf", {**_GRAD_OP, "gpus": 4, **_FULL}),
    ("qwen2.5-1.5b", {**_GRAD_OP, "gpus": 2, **_FULL}),
    ("llama-3.1-8b", {**_GRAD_OP, "gpus": 8, "autocast": "bf16", "grad_ckpt": True}),
    # FSDP+QLoRA: 4-bit weights sharded (bitsandbytes quant_storage), their constants whole on every rank
    ("llama-2-7b-hf", {**_FSDP, "gpus": 2, **_Q}),
    ("llama-2-7b-hf", {**_FSDP, "gpus": 4, **_Q, "batch_size": 2, "seq_len": 1024}),
    ("llama-2-7b-hf", {**_FSDP, "gpus": 8, **_Q, "batch_size": 4, "seq_len": 2048}),
    ("llama-2-7b-hf", {**_FSDP, "gpus": 2, **_Q, "targets": "all-linear", "rank": 16}),
    ("llama-2-7b-hf", {**_FSDP, "gpus": 4, **_Q, "upcast_non_quantized": False, "autocast": "bf16"}),
    ("llama-3.1-8b", {**_FSDP, "gpus": 4, **_Q, "batch_size": 2, "seq_len": 2048}),
    ("mistral-7b-v0.1", {**_FSDP, "gpus": 2, **_Q, "targets": "all-linear", "rank": 16}),
    ("qwen2.5-1.5b", {**_FSDP, "gpus": 4, **_Q}),
    ("opt-13b", {**_FSDP, "gpus": 2, **_Q}),
    ("llama-3.1-8b", {**_DDP, "gpus": 8, **_Q, "batch_size": 2}),
    ("llama-2-70b-hf", {**_FSDP, "gpus": 2, **_Q}),
    ("llama-2-70b-hf", {**_FSDP, "gpus": 2, **_Q, "upcast_non_quantized": False, "autocast": "bf16"}),
    ("llama-2-70b-hf", {**_FSDP, "gpus": 8, **_Q, "targets": "all-linear", "rank": 16}),
    ("llama-2-7b-hf", {**_GRAD_OP, "gpus": 4, **_Q}),
    # hybrid sharding: within a node, replicated across nodes
    ("llama-2-7b-hf", {**_HYBRID, "gpus": 4, "nodes": 2}),
    ("llama-2-7b-hf", {**_HYBRID, "gpus": 2, "nodes": 2, **_FULL}),
    ("llama-2-70b-hf", {**_HYBRID, "gpus": 4, "nodes": 2, **_Q}),
    ("qwen2.5-1.5b", {**_HYBRID, "gpus": 8, "nodes": 2, "batch_size": 4}),
    # DeepSpeed ZeRO (the real engine on fake tensors, memplan.measure.zero_sim; bf16 engine, Trainer auto buckets)
    ("llama-2-7b-hf", {**_Z2, "gpus": 2}),
    ("llama-2-7b-hf", {**_Z2, "gpus": 8, "targets": "all-linear", "rank": 16, "batch_size": 2}),
    ("llama-2-7b-hf", {**_Z2, "gpus": 4, **_Q}),
    ("llama-2-7b-hf", {**_Z1, "gpus": 4}),
    ("qwen2.5-1.5b", {**_Z2, "gpus": 2, "batch_size": 4}),
    ("llama-2-7b-hf", {**_Z3, "gpus": 2}),
    ("llama-2-7b-hf", {**_Z3, "gpus": 8, "grad_ckpt": True, "batch_size": 4}),
    ("llama-2-7b-hf", {**_Z3, "gpus": 2, **_Q}),
    # ZeRO-3 over the prefetcher's 1e9 live values, or a whole model smaller than that; other architectures
    ("gpt2-medium", {**_Z3, "gpus": 2, "batch_size": 4}),  # (Conv1D: no F.linear, no saved frozen inputs)
    ("qwen2.5-1.5b", {**_Z3, "gpus": 2, "batch_size": 4}),
    ("opt-1.3b", {**_Z3, "gpus": 4}),
    ("mistral-7b-v0.1", {**_Z3, "gpus": 4, "batch_size": 2, "seq_len": 1024, "autocast": "bf16"}),
    ("opt-13b", {**_Z3, "gpus": 4, "targets": "all-linear", "rank": 16, "grad_ckpt": True, "batch_size": 2}),
    ("llama-3.1-8b", {**_Z3, "gpus": 8, "grad_ckpt": True, "batch_size": 2, "seq_len": 2048}),
    # ZeRO-3 full fine-tuning: the step casts the gradient partition to fp32 one sub-group (1e9 values) at a time
    ("llama-2-7b-hf", {**_Z3, "gpus": 2, **_FULL}),
    ("qwen2.5-1.5b", {**_Z3, "gpus": 4, **_FULL, "batch_size": 2}),
    # ZeRO-3 over 4-bit weights, stored in bf16 as peft's DeepSpeed guide loads them (bnb_4bit_quant_storage)
    ("opt-13b", {**_Z3, "gpus": 4, **_Q, "batch_size": 2}),
    ("mistral-7b-v0.1", {**_Z3, "gpus": 2, **_Q, "targets": "all-linear", "rank": 16}),
    ("qwen2.5-1.5b", {**_Z3, "gpus": 2, **_Q}),
    ("llama-3.1-8b", {**_Z3, "gpus": 8, **_Q, "batch_size": 2, "seq_len": 2048}),
)
