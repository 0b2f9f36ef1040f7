"""Bad input, on purpose, across every command: each gets exit 2 and one line on stderr that names the bad value
(and what is allowed), never a traceback, and nothing on stdout. Found by trying memplan as a new user would.

The cases that need files build them in a temporary folder: a FIFO, /dev/zero, JSON nested 100,000 deep, a
binary CSV, a folder that is a file, a report that must not be replaced.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from memplan.cli import main

LONG = "a" * 300
HUGE_BUDGET = "9" * 400 + "GB"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    f = {}
    f["file"] = d / "a-file"
    f["file"].write_text("not a folder")
    f["fifo"] = d / "fifo"
    os.mkfifo(f["fifo"])
    f["deep"] = d / "deep.json"
    f["deep"].write_text("[" * 100_000 + "]" * 100_000)
    f["deep_cfg"] = d / "deep_cfg.json"
    f["deep_cfg"].write_text('{"a":' * 50_000 + "1" + "}" * 50_000)
    f["invalid"] = d / "invalid.json"
    f["invalid"].write_text('{"model_type": "opt",')
    f["list"] = d / "list.json"
    f["list"].write_text("[1, 2]")
    tiny = {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 128,
            "vocab_size": 100}
    for name, extra in (("huge_vocab", {"vocab_size": 10**12}), ("neg_pos", {"max_position_embeddings": -1}),
                        ("no_type", {"model_type": None}), ("odd_type", {"model_type": "not-a-model"}),
                        ("bad_dropout", {"dropout": "x"})):
        cfg = {**tiny, **extra}
        if cfg["model_type"] is None:
            del cfg["model_type"]
        (d / f"{name}.json").write_text(json.dumps(cfg))
        f[name] = d / f"{name}.json"
    f["empty_dir"] = d / "empty-folder"
    f["empty_dir"].mkdir()
    f["both_precisions"] = d / "training_args.json"
    f["both_precisions"].write_text(json.dumps({"per_device_train_batch_size": 2, "bf16": True, "fp16": True}))
    f["bin_csv"] = d / "bin.csv"
    f["bin_csv"].write_bytes(bytes(range(256)) * 4)
    f["wrong_csv"] = d / "wrong.csv"
    f["wrong_csv"].write_text("a,b\n1,2\n")
    f["report"] = d / "report"
    f["report"].mkdir()
    (f["report"] / "validation.md").write_text("# someone's committed report\n")
    (f["report"] / "capacity.md").write_text("# someone's committed report\n")
    return {k: str(v) for k, v in f.items()}


CASES = [
    # fit: what used to end in an AssertionError, then the rest
    ("fit-targets", ["fit", "opt-13b", "--gpu", "3090", "--targets", "foo"], "LoRA target 'foo' matches no module"),
    ("fit-optimizer", ["fit", "opt-13b", "--gpu", "3090", "--optimizer", "lion"], "unknown optimizer 'lion'"),
    ("fit-rank0", ["fit", "opt-13b", "--gpu", "3090", "--rank", "0"], "invalid LoRA rank 0"),
    ("fit-batch0", ["fit", "opt-13b", "--gpu", "3090", "--batch-size", "0"], "invalid batch size 0"),
    ("fit-seq", ["fit", "opt-13b", "--gpu", "3090", "--seq-len", "4096"], "exceeds opt-13b's learned position"),
    ("fit-flash-t4", ["fit", "opt-13b", "--gpu", "t4", "--attn", "flash_attention_2"], "compute capability >= 8.0"),
    ("fit-qlora-8", ["fit", "opt-13b", "--gpu", "3090", "--method", "qlora", "--bits", "8"], "means 4-bit"),
    ("fit-gpu-typo", ["fit", "opt-13b", "--gpu", "rtx 3095"], "did you mean: RTX 3090"),
    ("fit-gpu-unit", ["fit", "opt-13b", "--gpu", "24x"], "unknown GPU '24x'"),
    ("fit-below-context", ["fit", "opt-13b", "--gpu", "0.3GiB"], "leaves nothing for training"),
    ("fit-huge-budget", ["fit", "opt-13b", "--gpu", HUGE_BUDGET], "not a plausible size"),
    ("fit-petabytes", ["fit", "opt-13b", "--gpu", "2000TB"], "larger than any card"),
    ("fit-headroom", ["fit", "opt-13b", "--gpu", "3090", "--headroom", "0.9"], "headroom 0.9 is out of range"),
    ("fit-neg-headroom", ["fit", "opt-13b", "--gpu", "3090", "--headroom", "-1"], "headroom -1.0 is out of range"),
    ("fit-max-batch", ["fit", "opt-13b", "--gpu", "3090", "--max-batch", "0"], "invalid max batch 0"),
    ("fit-gpu-twice", ["fit", "opt-13b", "--gpu", "3090", "--gpu", "4090"], "--gpu given twice"),
    ("fit-rank-twice", ["fit", "opt-13b", "--gpu", "3090", "--rank", "8", "--rank", "16"], "--rank given twice"),
    ("fit-unknown-model", ["fit", "opt-14b", "--gpu", "3090"], "did you mean: opt-13b"),
    ("fit-long-name", ["fit", LONG, "--gpu", "3090"], "(300 characters)"),
    ("fit-no-model", ["fit", "--gpu", "3090"], "no model given"),
    ("fit-seq-neg", ["fit", "opt-13b", "--gpu", "3090", "--seq-len", "-5"], "invalid sequence length -5"),
    ("fit-dropout", ["fit", "opt-13b", "--gpu", "3090", "--lora-dropout", "1.5"], "invalid LoRA dropout 1.5"),
    ("fit-huge-rank", ["fit", "opt-13b", "--gpu", "3090", "--rank", "1000000000"], "larger than every adapted"),
    ("fit-free-unknown", ["fit", "opt-13b", "--gpu", "3090", "--free", "bogus"], "unknown field 'bogus' in --free"),
    ("fit-no-gpu", ["fit", "opt-13b"], "the following arguments are required: --gpu"),
    # estimate
    ("est-dtype", ["estimate", "opt-13b", "--dtype", "fp64"], "invalid choice: 'fp64'"),
    ("est-bits", ["estimate", "opt-13b", "--bits", "3"], "invalid choice: 3"),
    ("est-attn", ["estimate", "opt-13b", "--attn", "flash"], "invalid choice: 'flash'"),
    ("est-regex", ["estimate", "opt-13b", "--targets", "["], "not a valid regular expression"),
    ("est-upcast-16", ["estimate", "opt-13b", "--upcast"], "applies to 4/8-bit"),
    ("est-16-fp32", ["estimate", "opt-13b", "--bits", "16", "--dtype", "fp32"], "use --bits 32"),
    ("est-headroom-text", ["estimate", "opt-13b", "--headroom", "abc"], "invalid float value: 'abc'"),
    ("est-empty-gpu", ["estimate", "opt-13b", "--gpu", ""], "GPU name must be a non-empty string"),
    ("est-config-fifo", ["estimate", "opt-13b", "--config", "{fifo}"], "not a regular file"),
    ("est-config-zero", ["estimate", "opt-13b", "--config", "/dev/zero"], "not a regular file"),
    ("est-config-deep", ["estimate", "opt-13b", "--config", "{deep_cfg}"], "nested too deeply"),
    ("est-config-missing", ["estimate", "opt-13b", "--config", "/nonexistent.json"], "config file not found"),
    ("est-config-both", ["estimate", "opt-13b", "--config", "{both_precisions}"], "contradictory settings"),
    ("est-model-deep", ["estimate", "{deep}"], "nested too deeply"),
    ("est-model-invalid", ["estimate", "{invalid}"], "invalid JSON at line 1"),
    ("est-model-list", ["estimate", "{list}"], "must hold a JSON object"),
    ("est-huge-vocab", ["estimate", "{huge_vocab}"], "'vocab_size' 1,000,000,000,000 is beyond any"),
    ("est-neg-positions", ["estimate", "{neg_pos}"], "'max_position_embeddings' must be a positive integer"),
    ("est-no-type", ["estimate", "{no_type}"], "lacks 'model_type'"),
    ("est-odd-type", ["estimate", "{odd_type}"], "unsupported model_type 'not-a-model'"),
    ("est-bad-dropout", ["estimate", "{bad_dropout}"], "must be a dropout probability"),
    ("est-empty-folder", ["estimate", "{empty_dir}"], "holds no config.json"),
    ("est-missing-path", ["estimate", "./nope/config.json"], "no such config file or model folder"),
    # simulate and profile: checked before torch is needed
    ("sim-steps0", ["simulate", "opt-125m", "--steps", "0"], "invalid --steps 0"),
    ("sim-steps-neg", ["simulate", "opt-125m", "--steps", "-1"], "invalid --steps -1"),
    ("sim-model", ["simulate", "opt-14b"], "unknown model 'opt-14b'"),
    ("sim-semantics", ["simulate", "opt-125m", "--device-semantics", "tpu"], "invalid choice: 'tpu'"),
    ("prof-out-file", ["profile", "opt-125m", "--out", "{file}"], "is a file, not a folder"),
    ("prof-model", ["profile", "opt-14b", "--out", "{empty_dir}"], "unknown model 'opt-14b'"),
    ("prof-budget", ["profile", "opt-125m", "--tensor-budget", "2XB", "--out", "{empty_dir}"], "unknown GPU '2XB'"),
    ("prof-rank", ["profile", "opt-125m", "--rank", "0", "--out", "{empty_dir}"], "invalid LoRA rank 0"),
    # report
    ("rep-model", ["report", "capacity", "--models", "nope"], "unknown model 'nope'"),
    ("rep-gpu", ["report", "capacity", "--gpus", "nope"], "unknown GPU 'nope'"),
    ("rep-seq", ["report", "capacity", "--seq-len", "0"], "invalid sequence length 0"),
    ("rep-format", ["report", "capacity", "--format", "pdf"], "unknown format 'pdf'"),
    ("rep-headroom", ["report", "capacity", "--headroom", "0.9"], "headroom 0.9 is out of range"),
    ("rep-out-file", ["report", "capacity", "--models", "opt-125m", "--gpus", "3090", "--out", "{file}"],
     "is a file, not a folder"),
    ("rep-clobber", ["report", "capacity", "--models", "opt-125m", "--gpus", "3090", "--out", "{report}"],
     "already holds capacity.md"),
    # validate
    ("val-jobs", ["validate", "--jobs", "0"], "invalid --jobs 0"),
    ("val-runs", ["validate", "--runs", "/nonexistent"], "no such folder of run records"),
    ("val-rescore-missing", ["validate", "--rescore", "/nonexistent.csv"], "no such matrix CSV"),
    ("val-rescore-binary", ["validate", "--rescore", "{bin_csv}"], "cannot read matrix CSV"),
    ("val-rescore-columns", ["validate", "--rescore", "{wrong_csv}"], "not a validation matrix CSV"),
    ("val-out-file", ["validate", "--out", "{file}"], "is a file, not a folder"),
    ("val-clobber", ["validate", "--out", "{report}", "--no-simulate-runs"], "already holds validation.md"),
    # the rest
    ("gpus-headroom", ["gpus", "--headroom", "5"], "headroom 5.0 is out of range"),
    ("unknown-command", ["fti"], "invalid choice: 'fti'"),
    ("unknown-flag", ["fit", "opt-13b", "--gpu", "3090", "--bitz", "4"], "unrecognized arguments: --bitz"),
]


def _argv(argv, files):
    return [a.format(**files) if "{" in a else a for a in argv]


# Cases whose bad value is checked after the command's optional packages load (report: matplotlib first;
# validate: the measurement stack, which it imports before reading a --rescore CSV).
NEEDS = {"rep-out-file": ("matplotlib",), "rep-clobber": ("matplotlib",), "val-rescore-missing": ("torch",),
         "val-rescore-binary": ("torch",), "val-rescore-columns": ("torch",)}


@pytest.mark.parametrize("argv, needle", [pytest.param(*c[1:], id=c[0], marks=pytest.mark.extras(*NEEDS.get(c[0], ())))
                                          for c in CASES])
def test_bad_input_is_one_line_and_exit_2(argv, needle, files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output folder would land here, never in the checkout
    try:
        code = main(_argv(argv, files))
    except SystemExit as exc:  # argparse exits
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("memplan"), err
    assert needle in err, err
    assert "Traceback" not in err and out == ""
    assert len(err) < 600  # one readable line, not an echo of the input


def test_the_suite_is_large_enough():
    assert len(CASES) >= 60
    covered = {argv[0] for _, argv, _ in CASES}
    assert {"fit", "estimate", "simulate", "profile", "report", "validate", "gpus"} <= covered


def test_bare_memplan_and_report_print_help_on_stderr_exit_2(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "usage: memplan" in err
    assert main(["report"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "capacity" in err


def test_version(capsys):
    from memplan import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"memplan {__version__}"


@pytest.mark.parametrize("text, total", [("24G", 24 * 10**9), ("1TB", 10**12), ("24Gi", 24 * 2**30),
                                         ("2T", 2 * 10**12), ("512M", 512 * 10**6), ("0.5TiB", 2**39)])
def test_short_and_large_budget_units(text, total):
    from memplan.catalog.gpus import load_gpu

    assert load_gpu(text).total_bytes == total


# ---- the Python API takes what peft users pass, and refuses the rest with memplan's own errors -------------
def test_preflight_takes_peft_style_target_lists():
    import memplan

    by_list = memplan.preflight("opt-125m", targets=["q_proj", "v_proj"], gpu="3090")
    by_text = memplan.preflight("opt-125m", targets="q_proj,v_proj", gpu="3090")
    assert by_list.total_bytes == by_text.total_bytes and by_list.setup.targets == "q_proj,v_proj"
    by_set = memplan.estimate(memplan.TrainSetup("opt-125m", targets={"v_proj", "q_proj"}))
    assert by_set.setup.targets == "q_proj,v_proj"


@pytest.mark.parametrize("call, needle", [
    (lambda m: m.preflight("opt-125m", gpu=42), "invalid GPU 42 (int)"),
    (lambda m: m.preflight("opt-125m", gpu="3090", optimizer=42), "invalid optimizer 42 (int)"),
    (lambda m: m.preflight("opt-125m", gpu="3090", lora_dropout="x"), "invalid lora_dropout 'x' (str)"),
    (lambda m: m.preflight("opt-125m", gpu="3090", seq_len=True), "invalid seq_len True (bool)"),
    (lambda m: m.preflight("opt-125m", gpu="3090", grad_ckpt="yes"), "invalid grad_ckpt 'yes' (str)"),
    (lambda m: m.preflight("opt-125m", gpu="3090", budget_bytes=-1), "budget_bytes must be a positive integer"),
    (lambda m: m.preflight("opt-125m", gpu="3090", headroom=2), "headroom 2 is out of range"),
    (lambda m: m.preflight("opt-125m", gpu="3090", colour="red"), "unknown setup field(s) colour"),
    (lambda m: m.preflight(42, gpu="3090"), "cannot read a model from 'int'"),
    (lambda m: m.fit(m.TrainSetup("opt-125m"), 24), "invalid GPU 24 (int)"),
    (lambda m: m.fit(m.TrainSetup("opt-125m"), None), "fit needs a card or a budget"),
    (lambda m: m.estimate(m.TrainSetup(42)), "invalid model 42 (int)"),
    (lambda m: m.estimate(m.TrainSetup("opt-125m", rank=8.5)), "invalid rank 8.5 (float)"),
    (lambda m: m.estimate(m.TrainSetup("opt-125m", bits="4")), "invalid bits '4' (str)"),
])
def test_public_functions_check_their_arguments(call, needle):
    import memplan

    with pytest.raises(memplan.MemplanError) as exc:
        call(memplan)
    assert needle in str(exc.value)


def test_no_command_writes_into_the_checkout_by_default(tmp_path, monkeypatch, capsys):
    """validate and report write a fresh folder in the working directory; profile adds to memplan-runs/."""
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "--no-simulate-runs"]) == 0
    (made,) = list(tmp_path.glob("memplan-validation-*"))
    assert (made / "validation.md").is_file()
    assert main(["validate", "--no-simulate-runs", "--out", str(made)]) == 2  # its own report: --force needed
    assert "--force" in capsys.readouterr().err
    assert main(["validate", "--no-simulate-runs", "--out", str(made), "--force"]) == 0


def test_a_valid_request_that_cannot_be_planned_says_why(capsys):
    # 70B in 16 bits on a 12 GB card with everything pinned: nothing fits, exit 1, the reason in one place
    code = main(["fit", "llama-3.1-70b", "--gpu", "3060", "--bits", "16", "--batch-size", "1"])
    out, err = capsys.readouterr()
    assert code == 1 and "Nothing fits" in out and err == ""
    assert sys.version_info >= (3, 10)
