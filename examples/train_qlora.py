"""QLoRA fine-tuning with memplan's pre-flight check and run recording.

    python examples/train_qlora.py path/to/llama-2-7b-hf --seq-len 1024 --batch-size 4

1. Before loading anything, memplan.preflight checks the plan against the GPU's free memory and stops with
   the breakdown and the smallest change that fits (WontFitError) if it will not.
2. MemplanCallback re-checks the loaded model at on_train_begin and writes a run record (profiles/runs/ format)
   with the measured peaks when training ends -- or when it dies of an out-of-memory error.

--cpu runs a few steps on the CPU (no bf16, no GPU reading: pass --budget-gib) to try the script anywhere.
"""

import argparse

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

import memplan
from memplan.integrations import MemplanCallback

p = argparse.ArgumentParser()
p.add_argument("model", help="local model folder (config.json + weights)")
p.add_argument("--seq-len", type=int, default=1024)
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--steps", type=int, default=100)
p.add_argument("--budget-gib", type=float, default=None, help="plan for this much memory instead of the free memory")
p.add_argument("--cpu", action="store_true")
a = p.parse_args()
budget = int(a.budget_gib * 2**30) if a.budget_gib else None

bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.bfloat16)
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
args = TrainingArguments(output_dir="out", per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                         gradient_checkpointing=True, optim="paged_adamw_8bit", bf16=not a.cpu, use_cpu=a.cpu,
                         logging_steps=10, save_strategy="no", report_to=[])

# 1. Will it fit? Nothing is loaded yet: this reads config.json only.
plan = memplan.preflight(a.model, training_args=args, lora_config=lora, bnb_config=bnb, seq_len=a.seq_len,
                         budget_bytes=budget)
print(f"memplan: peak {plan.total_bytes / 2**30:.2f} GiB ({plan.peak_phase}), largest part: {plan.dominant}")

# 2. Load and train as usual; the callback checks the live model again and records the run.
model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=bnb, dtype=torch.bfloat16,
                                             device_map={"": "cpu" if a.cpu else 0})
model = get_peft_model(prepare_model_for_kbit_training(model, use_gradient_checkpointing=True), lora)
ids = torch.randint(0, model.config.vocab_size, (4 * a.batch_size, a.seq_len))  # your tokenized dataset here
dataset = [{"input_ids": x, "labels": x} for x in ids]
callback = MemplanCallback(seq_len=a.seq_len, budget_bytes=budget, record_dir="profiles/runs")
trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
trainer.train()
print(f"memplan: run record {callback.record_path}")
