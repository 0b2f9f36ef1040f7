"""QLoRA fine-tuning with memplan's pre-flight check and run recording.

Try it on a CPU, in well under a minute (examples/tiny-llama is a config.json only: a tiny llama, random weights):

    python examples/train_qlora.py examples/tiny-llama --cpu --budget-gib 1

A real run, on a GPU, with a local checkpoint folder:

    python examples/train_qlora.py path/to/llama-2-7b-hf --seq-len 1024 --batch-size 4 --steps 100

1. Before loading anything, memplan.preflight checks the plan against the GPU's free memory (or --budget-gib, or
   the catalog card --gpu names) and stops with the breakdown and the smallest change that fits if it will not.
2. MemplanCallback re-checks the loaded model at on_train_begin and writes a run record (memplan profile's
   format, into --out) with the measured peaks when training ends -- or when it dies of out-of-memory.

The defaults are a try-out: 5 steps of 2 sequences of 128 tokens. --cpu trains on the CPU (no bf16); with no GPU
to read, pass --budget-gib or --gpu to plan for one. A folder with a config.json and no weights gets random ones.
"""

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

import memplan
from memplan.integrations import MemplanCallback
from memplan.units import format_bytes, format_gib

PLAN_FOR = "pass --budget-gib 12 (a memory budget) or --gpu 3090 (a catalog card; memplan gpus lists them)"


def main(argv=None):
    a = parse_args(argv)
    if not a.cpu and not torch.cuda.is_available():
        sys.exit("train_qlora.py: no CUDA GPU is visible: add --cpu to train on the CPU"
                 + ("" if a.budget_gib or a.gpu else f", and {PLAN_FOR} to plan for a GPU"))
    try:
        train(a)
    except memplan.NoDeviceError:
        sys.exit(f"train_qlora.py: no GPU to read the free memory of: {PLAN_FOR}")
    except memplan.WontFitError as exc:
        # memplan's breakdown and the smallest changes that fit, then the script's flags that make them
        sys.exit(f"{exc}\ntrain_qlora.py: it will not fit: try a smaller --batch-size with --grad-accum "
                 f"(the same effective batch), a shorter --seq-len, or a larger --budget-gib / --gpu")
    except memplan.MemplanError as exc:
        sys.exit(f"train_qlora.py: {exc}")


def train(a):
    budget = max(1, int(a.budget_gib * 2**30)) if a.budget_gib else None
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    args = TrainingArguments(output_dir=str(Path(a.out) / "trainer"), per_device_train_batch_size=a.batch_size,
                             gradient_accumulation_steps=a.grad_accum, max_steps=a.steps,
                             activation_checkpointing=True, optim="paged_adamw_8bit", bf16=not a.cpu,
                             use_cpu=a.cpu, logging_steps=max(1, a.steps // 10), save_strategy="no", report_to=[])

    # 1. Will it fit? Nothing is loaded yet: this reads config.json only.
    plan = memplan.preflight(a.model, training_args=args, lora_config=lora, bnb_config=bnb, seq_len=a.seq_len,
                             gpu=a.gpu, budget_bytes=budget)
    # the largest tensor part (the CUDA context and the allocator's slack are the GPU runtime's, not the model's)
    tensors = {k: v for k, v in plan.components.items() if k not in ("cuda_context", "allocator_overhead")}
    largest = max(tensors, key=tensors.get)
    print(f"memplan: estimated GPU peak {format_gib(plan.total_bytes, 2)} ({plan.peak_phase}), largest tensor "
          f"part: {largest} {format_bytes(tensors[largest])}" + ("; training on the CPU" if a.cpu else ""))

    # 2. Load and train as usual; the callback checks the live model again and records the run.
    model = load_4bit(a.model, bnb, device="cpu" if a.cpu else 0, params=plan.params.total)
    # fp32 norms for stable training; checkpointing is the Trainer's (activation_checkpointing=True above)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    with warnings.catch_warnings():
        # peft's PeftModel reads model.is_gradient_checkpointing, which transformers 5 renamed (a FutureWarning
        # that peft, not this script, has to fix)
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        model = get_peft_model(model, lora)
    ids = torch.randint(0, model.config.vocab_size, (4 * a.batch_size, a.seq_len))  # your tokenized dataset here
    dataset = [{"input_ids": x, "labels": x} for x in ids]
    callback = MemplanCallback(seq_len=a.seq_len, gpu=a.gpu, budget_bytes=budget, record_dir=a.out)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
    trainer.train()
    print(f"memplan: run record {callback.record_path}")


def load_4bit(folder, bnb, device, params):
    """The model in 4 bits; a folder with a config.json and no weights (examples/tiny-llama) gets random ones."""
    if not Path(folder).is_dir() or any(f.suffix in (".safetensors", ".bin") for f in Path(folder).iterdir()):
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.bfloat16,
                                                    device_map={"": device})
    if params > 100_000_000:
        sys.exit(f"train_qlora.py: {folder} holds no weights (*.safetensors or *.bin); random weights are for "
                 f"tiny try-out models, not {params / 1e9:.1f}B parameters: download the checkpoint")
    print(f"train_qlora.py: {folder} holds no weights: random ones (a try-out; the loss means nothing)")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:  # from_pretrained quantizes a checkpoint as it loads it
        checkpoint = Path(tmp) / Path(folder).resolve().name  # the folder's name: the run record's model name
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)
        model.save_pretrained(checkpoint)
        return AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=bnb, dtype=torch.bfloat16,
                                                    device_map={"": device})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="QLoRA fine-tuning with memplan's pre-flight check and run recording.")
    p.add_argument("model", help="local model folder (config.json + weights; config.json alone: random weights)")
    p.add_argument("--seq-len", type=positive(int), default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch-size", type=positive(int), default=2, help="sequences per micro-batch (default 2)")
    p.add_argument("--grad-accum", type=positive(int), default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--steps", type=positive(int), default=5, help="optimizer steps (default 5)")
    p.add_argument("--budget-gib", type=positive(float), help="plan for this much GPU memory, not the free memory")
    p.add_argument("--gpu", metavar="NAME", help="plan for this catalog card (e.g. 3090), not the free memory")
    p.add_argument("--cpu", action="store_true", help="train on the CPU (no bf16): a try-out")
    p.add_argument("--out", default="memplan-runs", help="folder for the run record (default memplan-runs/ here)")
    return p.parse_args(argv)


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


if __name__ == "__main__":
    main()
