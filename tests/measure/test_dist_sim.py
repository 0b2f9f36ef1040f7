"""One rank of DDP and FSDP2 simulated by the real engines under torch's fake process group
(memplan.measure.dist_sim), against the analytic breakdown; what cannot be simulated says why in one line."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.extras("torch", "transformers", "peft")

from memplan.errors import InvalidSetupError  # noqa: E402
from memplan.plan.estimate import estimate_for  # noqa: E402
from memplan.plan.setup import TrainSetup, resolve_setup  # noqa: E402

TINY = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000,
        "max_position_embeddings": 2048, "tie_word_embeddings": False, "rms_norm_eps": 1e-6}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from memplan.catalog.models import load_model

    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(TINY))
    return load_model(str(path))


def _both(spec, **knobs):
    from memplan.measure.simulate import simulate_for

    setup = resolve_setup(TrainSetup(spec.name, batch_size=2, seq_len=64, autocast="off", **knobs), spec)
    return estimate_for(spec, setup, include_runtime=False), simulate_for(spec, setup)


def test_ddp_buckets_are_the_gradients_and_nothing_else_changes(tiny):
    one_est, one = _both(tiny)
    est, sim = _both(tiny, gpus=2, strategy="ddp")
    grads = one.phase_components["optimizer_step"]["gradients"]
    assert sim.components["comm_buffers"] == grads == est.components["comm_buffers"]
    assert sim.total_bytes == one.total_bytes + grads


@pytest.mark.parametrize("knobs", [
    {"gpus": 2}, {"gpus": 4}, {"gpus": 2, "fsdp_sharding": "grad-op"}, {"gpus": 2, "nodes": 2,
                                                                         "fsdp_sharding": "hybrid"},
    {"gpus": 2, "method": "qlora"}, {"gpus": 2, "method": "full"},
])
def test_fsdp2_rank_matches_the_analytic_breakdown(tiny, knobs):
    est, sim = _both(tiny, strategy="fsdp2", **knobs)
    # what FSDP2 holds is exact: every parameter's shard, its gradient and optimizer state
    for comp in ("weights", "quantized_weights", "lora_params", "optimizer_state", "gradients"):
        assert est.phases["optimizer_step"][comp] == pytest.approx(sim.phase_components["optimizer_step"][comp],
                                                                  abs=2048), comp
    # sharding adds no error of its own: a model this small has the single-GPU model's (up to 9% for its QLoRA
    # step), and the rank's ratio stays within 2.5% of it (measured: 1.5-2% for LoRA, whose backward moment the
    # analytic takes at the last layer; at real widths both are within 1%: reports/validation_matrix.csv)
    one_est, one = _both(tiny, **{k: v for k, v in knobs.items() if k not in ("gpus", "nodes", "fsdp_sharding")})
    assert est.total_bytes / sim.total_bytes == pytest.approx(one_est.total_bytes / one.total_bytes, abs=0.025)
    assert sim.components["comm_buffers"] > 0


def test_fsdp2_shards_shrink_with_the_ranks(tiny):
    _, two = _both(tiny, gpus=2, strategy="fsdp2")
    _, four = _both(tiny, gpus=4, strategy="fsdp2")
    assert four.components["weights"] < two.components["weights"]
    assert four.total_bytes < two.total_bytes


@pytest.mark.parametrize("knobs, why", [
    ({"strategy": "fsdp"}, "FullyShardedDataParallel refuses a CPU module"),
    ({"strategy": "zero3", "offload": "optimizer"}, "the device is the host"),
    ({"strategy": "fsdp2", "offload": "params"}, "the device is the host"),
])
def test_what_cannot_be_simulated_says_why(tiny, knobs, why):
    from memplan.measure.simulate import simulate_for

    setup = resolve_setup(TrainSetup(tiny.name, gpus=2, **knobs), tiny)
    with pytest.raises(InvalidSetupError) as err:
        simulate_for(tiny, setup)
    assert why in str(err.value) and "\n" not in str(err.value)


@pytest.mark.extras("deepspeed")
@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_deepspeed_rank_runs_on_fake_tensors_and_holds_what_the_analytic_says(tiny, strategy):
    """The real DeepSpeed engine under the fake process group (memplan.measure.zero_sim): what the rank holds at
    the step (its shards, master weights, optimizer state, gradient partition, kept buffers) is the analytic
    ZeRO state (a few % on a model this small: per-tensor rounding of its tiny tensors)."""
    est, sim = _both(tiny, gpus=2, strategy=strategy)
    assert sim.phases["optimizer_step"] == pytest.approx(sum(est.phases["optimizer_step"].values()), rel=0.03)
    assert sim.total_bytes > sim.phases["optimizer_step"]


def test_tracker_follows_in_place_resizes_and_tags():
    import torch

    from memplan.measure.tracker import MemoryTracker

    trk = MemoryTracker()
    with trk:
        with trk.phase("forward"):
            with trk.tagged("comm_buffers"):
                t = torch.empty(1000, dtype=torch.uint8)
            trk.resized(t)  # (same size: a new record of it)
            t.untyped_storage().resize_(0)
            trk.resized(t)
            after_free = trk.current_bytes
            t.untyped_storage().resize_(4000)
            trk.resized(t)
            keep = t  # noqa: F841 - alive at the end
    res = trk.result()
    assert after_free == 0
    assert res.peak_bytes == 4000 and res.final_bytes == 4000
    assert res.peak_components["activations"] == 4000  # born untagged, in forward


@pytest.mark.parametrize("knobs", [["--strategy", "fsdp2"], ["--strategy", "ddp", "--method", "qlora"]])
def test_profile_runs_every_rank_for_real_and_simulate_matches_it_to_the_byte(tiny, tmp_path, knobs):
    """``memplan profile --gpus 2`` launches two gloo processes under torchrun; the fake process group's
    simulation of rank 0 (CPU semantics), in a process of its own as the ranks are, allocates exactly what each
    real rank did (simulated in this process, after hundreds of other tests, it once differed by 4%)."""
    import subprocess
    import sys

    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "memplan", "profile", tiny.name, "--gpus", "2", *knobs, "--batch-size", "2",
           "--seq-len", "64", "--steps", "2", "--device", "cpu", "--out", str(out), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads(done.stdout)  # (stdout holds the JSON alone; the ranks' progress went to stderr)
    assert [r["environment"]["rank"] for r in records] == [0, 1]
    assert len(list(out.glob("*.json"))) == 2
    script = ("import json, sys; from memplan.measure.simulate import simulate; from memplan.plan.setup import "
              "TrainSetup; s = simulate(TrainSetup(**json.loads(sys.argv[1])), device_semantics='cpu'); "
              "print(json.dumps({'total': s.total_bytes, 'components': s.components}))")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(records[0]["setup"])], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    sim = json.loads(done.stdout.strip().splitlines()[-1])
    for r in records:
        assert r["outcome"] == "ok"
        assert (r["peak"]["tensor_peak_bytes"], r["peak"]["components"]) == (sim["total"], sim["components"])


@pytest.mark.parametrize("knobs, why", [
    (["--strategy", "zero3"], "profile runs ddp, fsdp2 across ranks, not zero3"),
    (["--nodes", "2", "--strategy", "ddp"], "profile launches the ranks of one node"),
])
def test_profile_refuses_what_it_cannot_launch(tiny, tmp_path, knobs, why):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "memplan", "profile", tiny.name, "--gpus", "2", *knobs, "--device", "cpu",
           "--out", str(tmp_path / "runs")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and why in done.stderr and done.stderr.count("\n") == 1, done.stderr
