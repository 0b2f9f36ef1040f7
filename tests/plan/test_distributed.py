"""Several GPUs: the knobs' rules (memplan.plan.distributed), one rank's breakdown (rank_memory, zero_memory) and
fit over N cards (multi_fit). The breakdowns are checked against the real engines in
tests/measure/test_dist_sim.py and benchmarks/validate_features.py."""

from __future__ import annotations

from dataclasses import replace

import pytest

from memplan.catalog.gpus import load_gpu
from memplan.catalog.models import load_model
from memplan.errors import InvalidSetupError
from memplan.plan.breakdown import PHASES
from memplan.plan.estimate import estimate_for
from memplan.plan.multi_fit import gpu_counts, split_gpus
from memplan.plan.search import fit, fit_for
from memplan.plan.setup import TrainSetup, resolve_setup

LLAMA = "llama-2-7b-hf"


@pytest.fixture(scope="module")
def llama():
    return load_model(LLAMA)


def _est(spec, **knobs):
    return estimate_for(spec, resolve_setup(TrainSetup(model=spec.name, **knobs), spec), include_runtime=False)


# ---------------------------------------------------------------------------------------------- the knobs


def test_one_gpu_is_single_and_several_default_to_ddp(llama):
    assert resolve_setup(TrainSetup(LLAMA), llama).strategy == "single"
    two = resolve_setup(TrainSetup(LLAMA, gpus=2), llama)
    assert (two.strategy, two.fsdp_sharding, two.offload) == ("ddp", None, "none")
    assert resolve_setup(TrainSetup(LLAMA, gpus=2, strategy="fsdp2"), llama).fsdp_sharding == "full"


@pytest.mark.parametrize("knobs, message", [
    ({"gpus": 2, "strategy": "single"}, "strategy single runs one process on one GPU, not 2"),
    ({"gpus": 0}, "invalid gpus 0; must be an integer >= 1"),
    ({"gpus": 2, "nodes": True}, "invalid nodes True"),
    ({"gpus": 2, "strategy": "fsdp-2"}, "invalid strategy 'fsdp-2' (did you mean fsdp2?)"),
    ({"gpus": 4, "strategy": "fsdp2", "fsdp_sharding": "hybrid"}, "hybrid sharding shards within a node"),
    ({"gpus": 2, "strategy": "ddp", "fsdp_sharding": "full"}, "--fsdp-sharding full applies to --strategy fsdp"),
    ({"gpus": 2, "strategy": "fsdp2", "offload": "optimizer"}, "--offload optimizer is not an option of FSDP2"),
    ({"gpus": 2, "strategy": "zero2", "offload": "params"}, "DeepSpeed offloads parameters at ZeRO-3 only"),
    ({"gpus": 2, "strategy": "ddp", "offload": "params"}, "DDP keeps everything on the GPU"),
    ({"gpus": 2, "strategy": "fsdp2", "bits": 8}, "cannot shard LLM.int8 weights"),
    ({"gpus": 5000}, "memplan plans up to 4,096"),
])
def test_bad_multi_gpu_knobs_get_one_line_naming_them(llama, knobs, message):
    with pytest.raises(InvalidSetupError, match=None) as err:
        resolve_setup(TrainSetup(LLAMA, **knobs), llama)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- one rank


def test_single_strategy_changes_nothing(llama):
    plain, single = _est(llama), _est(llama, strategy="single")
    assert plain.total_bytes == single.total_bytes and single.components["comm_buffers"] == 0


@pytest.mark.parametrize("knobs", [
    {"gpus": 2}, {"gpus": 4, "strategy": "fsdp2"}, {"gpus": 8, "strategy": "fsdp2", "method": "qlora"},
    {"gpus": 2, "strategy": "fsdp2", "fsdp_sharding": "grad-op"}, {"gpus": 4, "nodes": 2, "strategy": "fsdp2",
                                                                   "fsdp_sharding": "hybrid"},
    {"gpus": 2, "strategy": "fsdp", "offload": "params"}, {"gpus": 4, "strategy": "zero1"},
    {"gpus": 4, "strategy": "zero2", "offload": "optimizer"}, {"gpus": 8, "strategy": "zero3", "method": "full"},
    {"gpus": 2, "strategy": "zero3", "offload": "params", "method": "qlora"},
])
def test_every_phase_of_a_rank_sums_to_its_total(llama, knobs):
    e = _est(llama, **knobs)
    for phase in PHASES:
        assert all(v >= 0 for v in e.phases[phase].values()), (phase, e.phases[phase])
    assert e.total_bytes == sum(e.components.values()) == max(sum(c.values()) for c in e.phases.values())


def test_ddp_adds_buckets_the_size_of_the_gradients(llama):
    one, two = _est(llama), _est(llama, gpus=2)
    grads = one.phases["optimizer_step"]["gradients"]
    assert two.components["comm_buffers"] == pytest.approx(grads, abs=512)
    assert two.total_bytes - one.total_bytes == two.components["comm_buffers"]


def test_fsdp_divides_the_weights_and_adds_the_layers_in_flight(llama):
    one = _est(llama)
    ranks = {n: _est(llama, gpus=n, strategy="fsdp2") for n in (2, 4, 8)}
    for n, e in ranks.items():
        assert e.components["weights"] == pytest.approx(one.components["weights"] / n, rel=0.001)
        assert e.components["comm_buffers"] > 0
    assert ranks[2].total_bytes > ranks[4].total_bytes > ranks[8].total_bytes
    # grad-op keeps every layer gathered from its forward to its backward: more than full sharding
    assert _est(llama, gpus=4, strategy="fsdp2", fsdp_sharding="grad-op").total_bytes > ranks[4].total_bytes


def test_fsdp_qlora_shards_the_packed_weights_but_not_their_constants(llama):
    one, rank = _est(llama, method="qlora"), _est(llama, method="qlora", gpus=4, strategy="fsdp2")
    assert rank.components["quantized_weights"] == pytest.approx(one.components["quantized_weights"] / 4, rel=0.001)
    assert rank.components["quant_constants"] == one.components["quant_constants"]


def test_offload_moves_the_shards_to_host_memory(llama):
    kept = _est(llama, gpus=2, strategy="fsdp2")
    moved = _est(llama, gpus=2, strategy="fsdp2", offload="params")
    assert moved.total_bytes < kept.total_bytes
    assert moved.components["weights"] == 0
    assert set(moved.host_bytes) == {"parameters", "gradients", "optimizer_state"}
    assert moved.host_bytes["parameters"] == kept.components["weights"] + kept.components["lora_params"]


def test_zero_stages_partition_more_and_more(llama):
    full = {s: _est(llama, method="full", gpus=8, strategy=s) for s in ("ddp", "zero1", "zero2", "zero3")}
    assert full["ddp"].total_bytes > full["zero1"].total_bytes > full["zero2"].total_bytes > \
        full["zero3"].total_bytes
    offloaded = _est(llama, method="full", gpus=8, strategy="zero3", offload="optimizer")
    assert offloaded.components["optimizer_state"] == 0 and offloaded.host_bytes["optimizer_state"] > 0


def test_zero3_frozen_linears_keep_their_inputs(llama):
    """ZeRO-3's linear saves every frozen nn.Linear's input: per Llama layer the two normed inputs and the MLP's
    hidden activation (2 x hidden + intermediate per token, in bf16), and the lm_head's; not under ZeRO-2, not in
    full fine-tuning (the inputs are saved anyway), not for GPT-2's Conv1D (no F.linear)."""
    knobs = dict(method="lora", gpus=2, batch_size=1, seq_len=512, dtype="bf16", autocast="off")
    z2, z3 = _est(llama, strategy="zero2", **knobs), _est(llama, strategy="zero3", **knobs)
    per_token = 2 * (llama.num_layers * (2 * llama.hidden_size + llama.intermediate_size) + llama.hidden_size)
    assert z3.phases["forward_end"]["activations"] - z2.phases["forward_end"]["activations"] == 512 * per_token
    full = {s: _est(llama, **{**knobs, "method": "full", "strategy": s}) for s in ("zero2", "zero3")}
    assert full["zero3"].phases["forward_end"]["activations"] == full["zero2"].phases["forward_end"]["activations"]
    gpt2 = load_model("gpt2-medium")
    g2, g3 = (_est(gpt2, strategy=s, **knobs) for s in ("zero2", "zero3"))
    assert g3.phases["forward_end"]["activations"] - g2.phases["forward_end"]["activations"] == \
        512 * 2 * gpt2.hidden_size  # (the lm_head only)


def test_zero3_gathers_up_to_max_live_parameters(llama):
    """The prefetcher keeps 1e9 values gathered (2 GB in bf16) on a 7B model; a model under that, all of it."""
    from memplan.plan.zero_memory import MAX_LIVE_VALUES

    knobs = dict(method="lora", gpus=2, strategy="zero3", dtype="bf16")
    big = _est(llama, **knobs).phases["backward_start"]["comm_buffers"]
    assert 2 * MAX_LIVE_VALUES < big < 2 * MAX_LIVE_VALUES * 1.05  # (+ the reduce bucket and its copy)
    small = load_model("qwen2.5-0.5b")
    gathered = 2 * small.total_params()  # (bf16; norms and biases stay whole, under the persistence threshold)
    assert 0.95 * gathered < _est(small, **knobs).phases["backward_start"]["comm_buffers"] < 1.05 * gathered


def test_zero3_keeps_every_layers_4bit_weights_gathered_beyond_max_live(llama):
    """bitsandbytes holds each layer's gathered 4-bit weights until its backward: at the start of backward the whole
    model's are on the rank (and the estimate says why); in backward the prefetcher's window comes on top."""
    q = _est(llama, method="qlora", bits=4, gpus=2, strategy="zero3", grad_ckpt=True, dtype="bf16")
    packed = q.params.quantized // 2  # (4 bits per value)
    assert packed < q.phases["backward_start"]["comm_buffers"] < packed * 1.2
    assert q.phases["backward"]["comm_buffers"] > packed + 2e9
    assert any("4-bit weights stay on the rank" in n for n in q.notes)
    fsdp = _est(llama, method="qlora", bits=4, gpus=2, strategy="fsdp2", grad_ckpt=True, dtype="bf16")
    assert q.total_bytes - fsdp.total_bytes > 2e9  # (why fit does not pick ZeRO-3 over 4-bit unasked)


# ---------------------------------------------------------------------------------------------- fit


def test_gpu_counts_fill_a_node_then_whole_nodes():
    assert gpu_counts(32) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 24, 32]
    assert split_gpus(4) == (4, 1) and split_gpus(16) == (8, 2)


def test_fit_on_one_gpu_searches_no_engine(llama):
    r = fit_for(llama, TrainSetup(LLAMA), load_gpu("4090"))
    assert r.recommended.setup.strategy == "single" and r.gpus_tried is None


def test_fit_on_several_gpus_searches_the_engines(llama):
    # a 7B full fine-tune in bf16 fits one 80 GB card per rank under DDP, the engine that communicates least
    r = fit_for(llama, TrainSetup(LLAMA, method="full", gpus=8), load_gpu("a100-80gb"), pinned=frozenset({"method"}))
    assert (r.recommended.setup.gpus, r.recommended.setup.strategy) == (8, "ddp")
    # a 13B one (26 GB of weights, as much of gradients and twice that of AdamW state) needs its state sharded
    big = load_model("llama-2-13b-hf")
    r = fit_for(big, TrainSetup(big.name, method="full", gpus=8), load_gpu("a100-80gb"), pinned=frozenset({"method"}))
    s = r.recommended.setup
    assert s.strategy in ("zero1", "zero2", "fsdp2", "zero3") and s.offload == "none"


def test_gpus_auto_gives_the_fewest_cards_and_their_plan():
    r = fit(TrainSetup("llama-2-70b-hf", method="qlora"), "3090", pinned=frozenset({"method"}), gpus_auto=True)
    plan = r.recommended.setup
    assert plan.gpus * plan.nodes == 2 and r.gpus_tried == (1,)
    assert r.to_dict()["gpus"] == {"count": 2, "per_node": 2, "nodes": 1, "strategy": plan.strategy, "auto": True,
                                   "tried_without_fit": [1]}
    # and one card fewer does not fit: the search at one card has no plan
    one = fit(replace(TrainSetup("llama-2-70b-hf", method="qlora")), "3090", pinned=frozenset({"method"}))
    assert one.recommended is None
