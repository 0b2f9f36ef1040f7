"""``--loss``: transformers' cross-entropy, Liger's fused linear cross-entropy, a chunked cross-entropy
(memplan.plan.loss). Liger cannot run without Triton, so its chunk sizes are pinned by hand from its source."""

from __future__ import annotations

import importlib.util
import os

import pytest

from memplan.catalog.models import load_model
from memplan.errors import InvalidSetupError
from memplan.plan.estimate import estimate, estimate_for
from memplan.plan.loss import CHUNKED_OUTPUT_CHUNKS, LIGER_MODEL_TYPES, liger_chunk_size, loss_bytes
from memplan.plan.setup import TrainSetup, resolve_setup


def _resolved(model, **kw):
    spec = load_model(model)
    return spec, resolve_setup(TrainSetup(model, **kw), spec)


@pytest.mark.parametrize("bt, v, h, chunk", [
    # liger-kernel 0.8.5 fused_linear_cross_entropy_forward: inc_factor = cdiv(V, H);
    # chunk = min(next_power_of_2(cdiv(BT, inc_factor)), BT)
    (8192, 128256, 4096, 256),   # Llama-3.1-8B at 4 x 2048: cdiv(128256, 4096) = 32; 8192 / 32 = 256
    (3072, 128256, 4096, 128),   # 4 x 768: 3072 / 32 = 96 -> 128
    (4096, 151936, 1536, 64),    # Qwen2.5-1.5B: cdiv(151936, 1536) = 99; cdiv(4096, 99) = 42 -> 64
    (4096, 256000, 2304, 64),    # Gemma-2-2B: cdiv(256000, 2304) = 112; cdiv(4096, 112) = 37 -> 64
    (100, 1000, 2048, 100),      # V < H: inc_factor 1, next_power_of_2(100) = 128, capped at BT = 100
    (1, 128256, 4096, 1),
])
def test_liger_chunk_size_from_its_source(bt, v, h, chunk):
    assert liger_chunk_size(bt, v, h) == chunk


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or importlib.util.find_spec("liger_kernel") is None,
                    reason="liger-kernel imports Triton at module level; the hand-computed cases above pin it")
def test_liger_chunk_size_matches_liger_itself():  # pragma: no cover - needs Triton
    import triton

    for bt, v, h in [(8192, 128256, 4096), (4096, 151936, 1536), (777, 50272, 2048)]:
        inc = triton.cdiv(v, h)
        assert liger_chunk_size(bt, v, h) == min(triton.next_power_of_2(triton.cdiv(bt, inc)), bt)


def test_llama31_8b_logits_saving_at_4x2048():
    # The numbers: the fused loss never materialises the 128k-wide logits.
    est = {loss: estimate(TrainSetup("llama-3.1-8b", batch_size=4, seq_len=2048, loss=loss))
           for loss in ("default", "liger", "chunked")}
    tv = 4 * 2048 * 128256
    default = est["default"].phases["backward_start"]["logits_loss"]
    assert default == 12 * tv  # fp32 log-softmax + the gradients of nll_loss and log_softmax
    # liger at forward end: grad_input (bf16) + one 256 x V chunk (bf16) + loss_1d + target_mask
    assert est["liger"].phases["forward_end"]["logits_loss"] == 8192 * 4096 * 2 + 256 * 128256 * 2 + 8192 * 5
    assert est["liger"].phases["backward_start"]["logits_loss"] == 8192 * 4096 * 2
    # chunked: all bf16 chunks + all fp32 log-softmaxes + one chunk's fp32 copy; 8 chunks of 1024 tokens
    assert est["chunked"].phases["forward_end"]["logits_loss"] == tv * 2 + tv * 4 + 1024 * 128256 * 4
    assert est["chunked"].phases["backward_start"]["logits_loss"] == tv * 4 + 2 * 1024 * 128256 * 4
    assert est["liger"].total_bytes < est["chunked"].total_bytes < est["default"].total_bytes


def test_default_loss_is_the_stack_loss_unchanged():
    spec, s = _resolved("opt-1.3b", batch_size=2, seq_len=256)
    assert s.loss == "default"
    assert loss_bytes(spec, s, 123, 456) == (123, 456)


def test_chunked_counts_the_largest_chunk_and_gemma_softcap():
    spec, s = _resolved("gemma-2-2b", batch_size=3, seq_len=1001, loss="chunked", bits=16, autocast="off")
    tokens, v = 3 * 1001, spec.vocab_size
    chunk = 3 * -(-1001 // CHUNKED_OUTPUT_CHUNKS)  # torch.chunk: ceil(1001 / 8) = 126 positions per row
    fwd, bwd = loss_bytes(spec, s, 0, 0)
    assert fwd == tokens * v * 2 + chunk * v * 4 + tokens * v * 4 + tokens * v * 2
    assert bwd == tokens * v * 4 + 2 * chunk * v * 4 + tokens * v * 2


def test_chunked_under_autocast_casts_an_fp32_lm_head_per_chunk():
    spec, s = _resolved("qwen2.5-1.5b", batch_size=4, seq_len=1024, loss="chunked", bits=4)
    assert s.autocast == "bf16" and s.upcast_non_quantized
    tv = 4096 * spec.vocab_size
    casts = (CHUNKED_OUTPUT_CHUNKS - 1) * spec.vocab_size * spec.hidden_size * 2
    fwd, _ = loss_bytes(spec, s, 0, 0)
    assert fwd == tv * 2 + 512 * spec.vocab_size * 4 + tv * 4 + casts


def test_liger_full_fine_tuning_makes_the_head_gradient_in_forward():
    spec, s = _resolved("qwen2.5-1.5b", batch_size=1, seq_len=512, loss="liger", method="full", bits=16)
    lora = resolve_setup(TrainSetup("qwen2.5-1.5b", batch_size=1, seq_len=512, loss="liger", bits=16), spec)
    head = spec.vocab_size * spec.hidden_size * 2
    assert loss_bytes(spec, s, 0, 0)[0] - loss_bytes(spec, lora, 0, 0)[0] == head
    assert loss_bytes(spec, s, 0, 0)[1] == loss_bytes(spec, lora, 0, 0)[1]


def test_liger_refused_where_liger_has_no_patch():
    spec = load_model("opt-1.3b")
    assert spec.model_type not in LIGER_MODEL_TYPES
    with pytest.raises(InvalidSetupError, match="no patch for model_type 'opt'.*for opt-1.3b: default, chunked"):
        resolve_setup(TrainSetup("opt-1.3b", loss="liger"), spec)
    for model in ("llama-3.1-8b", "qwen2.5-1.5b", "gemma-2-2b", "mistral-7b-v0.1"):
        spec = load_model(model)
        assert resolve_setup(TrainSetup(model, loss="liger"), spec).loss == "liger"


def test_savers_refused_for_a_masked_lm_and_bad_names():
    spec = load_model("bert-large-uncased")
    for loss in ("liger", "chunked"):
        with pytest.raises(InvalidSetupError, match="needs a causal language model"):
            resolve_setup(TrainSetup("bert-large-uncased", loss=loss), spec)
    with pytest.raises(InvalidSetupError, match="invalid loss 'fused'; allowed: default, liger, chunked"):
        resolve_setup(TrainSetup("opt-1.3b", loss="fused"), load_model("opt-1.3b"))


def test_liger_module_list_matches_the_downloaded_source():
    """When liger's source is at hand (``LIGER_SRC`` = an unpacked wheel), its map must equal ours."""
    src = os.environ.get("LIGER_SRC")
    if not src:
        pytest.skip("set LIGER_SRC to an unpacked liger-kernel wheel to compare MODEL_TYPE_TO_APPLY_LIGER_FN")
    import re

    text = open(os.path.join(src, "liger_kernel", "transformers", "monkey_patch.py"), encoding="utf-8").read()
    block = text[text.index("MODEL_TYPE_TO_APPLY_LIGER_FN = {"):]
    block = block[:block.index("}")]
    assert set(re.findall(r'"([a-z0-9_]+)":', block)) == set(LIGER_MODEL_TYPES)


def test_estimate_for_sees_the_loss():
    spec, s = _resolved("tinyllama-1.1b", batch_size=2, seq_len=512, loss="chunked")
    spec, d = _resolved("tinyllama-1.1b", batch_size=2, seq_len=512)
    assert estimate_for(spec, s).phases["forward_end"]["logits_loss"] < \
        estimate_for(spec, d).phases["forward_end"]["logits_loss"]
