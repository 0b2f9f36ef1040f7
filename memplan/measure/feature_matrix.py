"""The validation matrix's rows for what a script switches on beyond plain LoRA: adapter variants, the chunked
loss, activation offloading, packing and measured sequence lengths (issue "What else users switch on").

Each is one real-width catalog model with the knobs of that feature on top of the grid's base knobs (LoRA r=8 on
the default targets, bf16 weights, no autocast, batch 1 x 512, sdpa, AdamW, no checkpointing; the 4-bit rows are
QLoRA with its checkpointing). Liger's fused loss needs Triton and cannot be simulated: its rows are not here
(tests/plan/test_loss.py pins its chunking to its source instead), nor the initialisation phase, which is no
training step (tests/measure/test_init_measure.py measures it against peft).
"""

from __future__ import annotations

__all__ = ["MATRIX_FEATURES", "FEATURE_KEYS", "FEATURE_KEY_DEFAULTS", "LENGTHS_FIXTURE"]

# The setup columns the features add to validation_matrix.csv, with the value a row written before them had.
FEATURE_KEY_DEFAULTS = {"adapter": "lora", "modules_to_save": None, "trainable_tokens": 0, "loss": "default",
                        "packing": "off", "seq_len_file": None, "activation_offload": "off"}
FEATURE_KEYS = tuple(FEATURE_KEY_DEFAULTS)

# A dataset's lengths (1,120 sequences, 96 to 3,000 tokens), committed with the tests
LENGTHS_FIXTURE = "tests/fixtures/seq_lengths_hist.txt"
_H = LENGTHS_FIXTURE
_Q = {"method": "qlora", "bits": 4, "grad_ckpt": True}  # QLoRA as prepare_model_for_kbit_training runs it

MATRIX_FEATURES: tuple[tuple[str, dict], ...] = (
    # DoRA: the magnitude, the saved base and LoRA results, the weight copies under dropout, the weight-norm transient
    ("llama-2-7b-hf", {"adapter": "dora"}),
    ("llama-2-7b-hf", {"adapter": "dora", "targets": "all-linear"}),
    ("llama-2-7b-hf", {"adapter": "dora", "batch_size": 4}),
    ("llama-2-7b-hf", {"adapter": "dora", "grad_ckpt": True}),
    ("llama-2-7b-hf", {"adapter": "dora", "targets": "all-linear", "grad_ckpt": True}),
    ("llama-2-7b-hf", {"adapter": "dora", "lora_dropout": 0.0, "batch_size": 2}),
    ("llama-2-7b-hf", {"adapter": "dora", "autocast": "bf16"}),
    ("llama-2-7b-hf", {"adapter": "dora", **_Q}),
    ("llama-2-7b-hf", {"adapter": "dora", "targets": "all-linear", "rank": 16, **_Q}),
    ("llama-3.1-8b", {"adapter": "dora"}),
    ("llama-3.1-8b", {"adapter": "dora", "targets": "all-linear", "rank": 16, "batch_size": 2, **_Q}),
    ("llama-3.1-8b", {"adapter": "dora", "autocast": "bf16", "grad_ckpt": True, "batch_size": 4}),
    ("qwen2.5-1.5b", {"adapter": "dora"}),
    ("qwen2.5-1.5b", {"adapter": "dora", "targets": "all-linear", "batch_size": 4}),
    ("opt-1.3b", {"adapter": "dora"}),
    ("opt-1.3b", {"adapter": "dora", "targets": "all-linear", "batch_size": 4}),
    ("gemma-2-2b", {"adapter": "dora", "attn": "eager"}),
    # LoRA-FA: A frozen, peft's LoraFAOptimizer
    ("llama-2-7b-hf", {"adapter": "lora-fa", "targets": "all-linear", "rank": 64}),
    ("llama-3.1-8b", {"adapter": "lora-fa", "batch_size": 4}),
    ("qwen2.5-1.5b", {"adapter": "lora-fa", "targets": "all-linear", "rank": 64, "batch_size": 4}),
    ("opt-1.3b", {"adapter": "lora-fa", "batch_size": 4}),
    ("mistral-7b-v0.1", {"adapter": "lora-fa", "targets": "all-linear", "rank": 16, **_Q}),
    # IA3
    ("llama-2-7b-hf", {"adapter": "ia3"}),
    ("llama-3.1-8b", {"adapter": "ia3", "batch_size": 4}),
    ("opt-1.3b", {"adapter": "ia3", "batch_size": 4}),
    ("qwen2.5-1.5b", {"adapter": "ia3", "batch_size": 4}),
    ("mistral-7b-v0.1", {"adapter": "ia3", **_Q}),
    # modules_to_save: full trainable copies (a tied lm_head's too)
    ("llama-3.1-8b", {"modules_to_save": "lm_head"}),
    ("llama-2-7b-hf", {"modules_to_save": "lm_head,embed_tokens", "batch_size": 2}),
    ("qwen2.5-1.5b", {"modules_to_save": "lm_head", "batch_size": 4}),
    ("opt-1.3b", {"modules_to_save": "lm_head", "batch_size": 4}),
    ("gemma-2-2b", {"modules_to_save": "embed_tokens", "attn": "eager"}),
    ("mistral-7b-v0.1", {"modules_to_save": "lm_head", **_Q}),
    # trainable_token_indices
    ("llama-3.1-8b", {"trainable_tokens": 16}),
    ("qwen2.5-1.5b", {"trainable_tokens": 16, "batch_size": 4}),
    ("gemma-2-2b", {"trainable_tokens": 8, "attn": "eager"}),
    ("llama-2-7b-hf", {"trainable_tokens": 32, **_Q}),
    # the chunked cross-entropy (torchtune's CEWithChunkedOutputLoss)
    ("llama-3.1-8b", {"loss": "chunked", "batch_size": 4, "seq_len": 1024}),
    ("llama-3.1-8b", {"loss": "chunked", "batch_size": 4, "seq_len": 1024, "grad_ckpt": True}),
    ("llama-3.1-8b", {"loss": "chunked", "batch_size": 4, "seq_len": 1024, **_Q}),
    ("qwen2.5-1.5b", {"loss": "chunked", "batch_size": 4, "seq_len": 1024}),
    ("qwen2.5-1.5b", {"loss": "chunked", "batch_size": 4, "seq_len": 1024, **_Q}),
    ("gemma-2-2b", {"loss": "chunked", "batch_size": 4, "seq_len": 1024, "attn": "eager", "grad_ckpt": True}),
    ("opt-1.3b", {"loss": "chunked", "batch_size": 4, "seq_len": 1024}),
    ("opt-1.3b", {"loss": "chunked", "batch_size": 4, "seq_len": 1024, **_Q}),
    # activation offloading: TRL's OffloadActivations (pinned) and save_on_cpu (pageable)
    ("llama-3.1-8b", {"activation_offload": "pinned", "batch_size": 4, "seq_len": 2048}),
    ("llama-3.1-8b", {"activation_offload": "pageable", "batch_size": 4, "seq_len": 2048}),
    ("llama-3.1-8b", {"activation_offload": "pinned", "batch_size": 4, "seq_len": 2048, "grad_ckpt": True}),
    ("llama-3.1-8b", {"activation_offload": "pinned", "batch_size": 4, "seq_len": 2048, **_Q}),
    ("opt-1.3b", {"activation_offload": "pinned", "batch_size": 4, "seq_len": 1024}),
    ("opt-1.3b", {"activation_offload": "pageable", "batch_size": 4, "seq_len": 1024, "grad_ckpt": True}),
    # sequence shapes: a lengths file (padded batches), TRL packing, padding-free rows
    ("llama-3.1-8b", {"seq_len_file": _H, "batch_size": 4, "seq_len": 1024, **_Q}),
    ("llama-3.1-8b", {"seq_len_file": _H, "batch_size": 4, "seq_len": 4096, **_Q}),
    ("llama-3.1-8b", {"packing": "packed", "seq_len_file": _H, "batch_size": 4, "seq_len": 1024,
                      "attn": "flash_attention_2", **_Q}),
    ("llama-3.1-8b", {"packing": "packed", "seq_len_file": _H, "batch_size": 4, "seq_len": 1024, **_Q}),
    ("llama-3.1-8b", {"packing": "padding-free", "seq_len_file": _H, "batch_size": 4, "seq_len": 1024,
                      "attn": "flash_attention_2"}),
    ("llama-3.1-8b", {"seq_len_file": _H, "batch_size": 8, "seq_len": 1024, "grad_ckpt": True}),
    ("qwen2.5-1.5b", {"packing": "padding-free", "seq_len_file": _H, "batch_size": 4, "seq_len": 1024}),
    ("qwen2.5-1.5b", {"packing": "packed", "seq_len_file": _H, "batch_size": 4, "seq_len": 1024,
                      "attn": "flash_attention_2", "grad_ckpt": True}),
    ("qwen2.5-1.5b", {"packing": "packed", "seq_len_file": _H, "batch_size": 2, "seq_len": 1024, "attn": "eager",
                      "grad_ckpt": True}),
    ("qwen2.5-1.5b", {"seq_len_file": _H, "batch_size": 4, "seq_len": 4096}),
    ("mistral-7b-v0.1", {"packing": "padding-free", "seq_len_file": _H, "batch_size": 2, "seq_len": 1024,
                         "attn": "flash_attention_2"}),
    ("opt-1.3b", {"seq_len_file": _H, "batch_size": 8, "seq_len": 1024}),
    ("opt-1.3b", {"packing": "packed", "seq_len_file": _H, "batch_size": 4, "seq_len": 1024,
                  "attn": "flash_attention_2"}),
    # two features at once
    ("llama-3.1-8b", {"adapter": "dora", "loss": "chunked", "batch_size": 2, "seq_len": 1024, **_Q}),
    ("llama-3.1-8b", {"modules_to_save": "lm_head", "activation_offload": "pinned", "batch_size": 2,
                      "seq_len": 1024}),
    ("qwen2.5-1.5b", {"adapter": "dora", "packing": "packed", "seq_len_file": _H, "batch_size": 4, "seq_len": 1024,
                      "attn": "flash_attention_2"}),
)
