"""The command line: JSON shapes other tools rely on, exit codes, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from memplan.cli import main
from tests.cli_run import run


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    return code, json.loads(out)


def test_estimate_json_interface(capsys):
    code, d = run_json(capsys, "estimate", "opt-13b", "--method", "lora", "--bits", "16", "--dtype", "fp16",
                       "--rank", "16", "--alpha", "32", "--targets", "q_proj,v_proj", "--lora-dropout", "0.05",
                       "--adapter-dtype", "fp32", "--optimizer", "adamw_torch", "--batch-size", "1",
                       "--seq-len", "512", "--no-grad-ckpt", "--attn", "sdpa", "--gpu", "3090")
    assert code == 1  # 16-bit OPT-13B does not fit a 3090: the exit status says so
    assert d["budget"]["fits"] is False and d["budget"]["spare_bytes"] < 0
    assert d["budget"]["budget_bytes"] == 24576 * 2**20 - int(0.05 * 24576 * 2**20)
    assert isinstance(d["total_bytes"], int)
    assert sum(d["components"].values()) == d["total_bytes"]
    assert d["params"] == {"total": 12_853_473_280, "trainable": 13_107_200, "quantized": 0}
    assert d["peak_phase"] in ("forward_end", "backward_start", "backward", "backward_end", "optimizer_step")
    s = d["setup"]
    assert (s["model"], s["bits"], s["rank"], s["alpha"], s["targets"], s["gpu"]) == (
        "opt-13b", 16, 16, 32, "q_proj,v_proj", "rtx-3090")


def test_estimate_4bit_flags(capsys):
    code, d = run_json(capsys, "estimate", "llama-2-7b", "--bits", "4", "--quant", "fp4", "--no-double-quant",
                       "--grad-ckpt", "--targets", "all-linear")
    assert code == 0
    assert d["setup"]["method"] == "qlora" or d["setup"]["bits"] == 4
    assert d["setup"]["quant_type"] == "fp4" and d["setup"]["double_quant"] is False
    assert d["setup"]["grad_ckpt"] is True


def test_fit_json_interface(capsys):
    code, d = run_json(capsys, "fit", "opt-13b", "--gpu", "3090")
    assert code == 0
    assert {"name", "total_bytes", "usable_bytes"} <= set(d["gpu"])
    assert d["recommended"]["total_bytes"] <= d["gpu"]["budget_bytes"]
    assert all(sum(a["components"].values()) == a["total_bytes"] for a in d["alternatives"])


def test_fit_human_output_mentions_the_pieces(capsys):
    code, out, _ = run(capsys, "fit", "opt-13b", "--gpu", "3090")
    assert code == 0
    for piece in ("Recommended (balanced):", "Where the memory goes", "Alternatives", "Next size up",
                  "Longest sequence", "total", "GiB"):
        assert piece in out


def test_fit_nothing_fits_exits_1(capsys):
    code, out, _ = run(capsys, "fit", "llama-3.1-405b", "--gpu", "3060")
    assert code == 1
    assert "Nothing fits" in out


def test_models_and_gpus_json(capsys):
    code, models = run_json(capsys, "models")
    assert code == 0 and len(models) >= 40
    assert {"id", "hf_id", "params"} <= set(models[0])
    code, gpus = run_json(capsys, "gpus")
    assert code == 0 and len(gpus) >= 24
    assert all(g["usable_bytes"] < g["total_bytes"] for g in gpus)


def test_human_tables_render(capsys):
    assert run(capsys, "models")[0] == 0
    assert run(capsys, "gpus")[0] == 0
    code, out, _ = run(capsys, "estimate", "opt-13b", "--phases")
    assert code == 0 and "backward_start" in out and "total" in out


def test_local_config_path_and_folder(tmp_path, capsys):
    cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 512}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, by_file = run_json(capsys, "estimate", str(tmp_path / "config.json"))
    assert code == 0
    code, by_dir = run_json(capsys, "estimate", str(tmp_path))
    assert code == 0
    assert by_file["components"] == by_dir["components"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["estimate", "opt-14b"], "opt-13b"),  # suggestion
        (["fit", "opt-13b", "--gpu", "rtx 3095"], "3090"),
        (["estimate", "opt-13b", "--rank", "0"], "rank"),
        (["estimate", "opt-13b", "--bits", "3"], "invalid choice: 3"),
        (["estimate", "opt-13b", "--batch-size", "-4"], "batch size"),
        (["estimate", "opt-13b", "--targets", "w_proj"], "w_proj"),
        (["estimate", "opt-13b", "--optimizer", "adamw_fancy"], "adamw_fancy"),
        (["estimate", "opt-13b", "--rank", "abc"], "invalid int value"),
        (["fit", "opt-13b"], "--gpu"),
        (["fit", "opt-13b", "--gpu", "3090", "--headroom", "2"], "headroom"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, expected):
    with pytest.raises(SystemExit) as exc:
        code = main(argv)
        raise SystemExit(code)
    assert exc.value.code == 2
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert expected in lines[0]
    assert "Traceback" not in err


def test_malformed_config_json_exits_2(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, "estimate", str(bad))
    assert code == 2
    assert str(bad) in err and len(err.strip().splitlines()) == 1


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "memplan", "estimate", "gpt2", "--json"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["params"]["total"] == 124_439_808


def test_measurement_commands_without_torch_say_what_to_install(monkeypatch, capsys):
    # Simulate a core-only install: importing torch fails.
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "memplan.measure.simulate", raising=False)
    monkeypatch.delitem(sys.modules, "memplan.measure.tracker", raising=False)
    monkeypatch.delitem(sys.modules, "memplan.measure.build", raising=False)
    code = main(["simulate", "gpt2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "needs torch" in err and "memplan[profile]" in err and len(err.strip().splitlines()) == 1
