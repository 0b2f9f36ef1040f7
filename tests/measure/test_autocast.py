"""memplan.measure.autocast: CUDA's autocast policy on CPU tensors, held to the installed torch's own table and
checked op by op on small Llama-, OPT- and GPT-2-style training steps."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.extras import require

pytestmark = require("torch", "transformers", "peft")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from memplan.measure.autocast import _CUDA_ONLY, CUDA_AUTOCAST_POLICY, cuda_autocast, policy_of  # noqa: E402

HEADER = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
_MACROS = {"AT_FORALL_LOWER_PRECISION_FP": "lower_precision_fp", "AT_FORALL_FP32": "fp32",
           "AT_FORALL_FP32_SET_OPT_DTYPE": "fp32_set_opt_dtype", "AT_FORALL_PROMOTE": "promote"}


def _header_lists() -> dict[str, tuple[str, ...]]:
    text = HEADER.read_text()
    out = {}
    for macro, policy in _MACROS.items():
        body = re.search(rf"#define {macro}\(_\)(.*?)\n\n", text, re.S).group(1)
        entries = re.findall(r"_\((\w+)(?:,\s*(\w+))?\)", body)
        out[policy] = tuple(f"{name}.{overload}" if overload else name for name, overload in entries)
    norm = re.search(r"#define AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE\(_\)(.*?)\n\n", text, re.S).group(1)
    out["fp32_append_dtype"] = tuple(re.findall(r'"(norm\.\w+)",', norm))
    return out


@pytest.mark.skipif(not HEADER.exists(), reason="this torch wheel ships no ATen headers")
def test_the_policy_is_the_installed_torchs_header():
    header = _header_lists()
    assert {k: v for k, v in CUDA_AUTOCAST_POLICY.items() if k != "banned"} == header


def test_the_policy_covers_exactly_the_ops_cuda_autocast_registers():
    """The dispatcher of the installed torch knows which ops have an AutocastCUDA kernel (a CPU build registers
    them too): the table has each of them, and nothing else."""
    registered = {name[len("aten::"):] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCUDA")}
    listed = {q for names in CUDA_AUTOCAST_POLICY.values() for q in names}
    assert registered - set(_CUDA_ONLY) == listed


class _Log(TorchDispatchMode):
    """Every aten op below autograd (after autocast's casts): (op, input dtypes, output dtypes, explicit dtype)."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [a.dtype for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outs = [o.dtype for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        self.rows.append((func, ins, outs))
        return out


def _tiny(kind: str, attn: str):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig,
                              OPTForCausalLM)

    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                            attn_implementation=attn))
    if kind == "opt":
        return OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                        vocab_size=100, word_embed_proj_dim=64, max_position_embeddings=64,
                                        attn_implementation=attn))
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, attn_implementation=attn))


# Below autograd the listed composites show up as the kernels they run: linear/matmul as mm/addmm/bmm/baddbmm,
# softmax.int / log_softmax.int as _softmax / _log_softmax, layer_norm as native_layer_norm.
_LOWER_KERNELS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu"}
_FP32_KERNELS = {"native_layer_norm", "_softmax", "_log_softmax", "pow", "rsqrt", "exp", "log", "sum", "cumsum",
                 "nll_loss_forward", "prod"}


@pytest.mark.parametrize("kind, attn", [("llama", "sdpa"), ("llama", "eager"), ("opt", "eager"), ("gpt2", "eager")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights", [torch.bfloat16, torch.float32])  # 16-bit weights, or fp32 master weights
def test_every_forward_op_runs_in_the_dtype_cudas_policy_prescribes(kind, attn, dtype, weights):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny(kind, attn).to(weights), LoraConfig(r=4, target_modules="all-linear"))
    ids = torch.randint(0, 100, (2, 16))
    log = _Log()
    with cuda_autocast(dtype), log:
        loss = model(input_ids=ids, labels=ids).loss
    checked = {"lower": 0, "fp32": 0}
    for func, ins, outs in log.rows:
        name = func.overloadpacket.__name__
        floats = [d for d in outs if d.is_floating_point]
        if not floats:
            continue
        if name in _LOWER_KERNELS:
            assert floats[0] == dtype, (name, ins, outs)
            checked["lower"] += 1
        elif name in _FP32_KERNELS:
            assert floats[0] == torch.float32, (name, ins, outs)
            checked["fp32"] += 1
    assert checked["lower"] >= 10 and checked["fp32"] >= 3, checked
    loss.backward()  # the graph autocast built is a valid one
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_trainable_fp32_weights_are_cast_once_per_forward_and_frozen_ones_every_use():
    """CUDA's cached_cast: an fp32 leaf that requires grad is cast once per autocast region (the copy lives until
    it exits); a frozen weight is cast at each use."""
    w = torch.randn(8, 8, requires_grad=True)
    frozen = torch.randn(8, 8)
    x = torch.randn(4, 8)
    log = _Log()
    with cuda_autocast(torch.bfloat16), log:
        for _ in range(3):
            torch.nn.functional.linear(x, w)
            torch.nn.functional.linear(x, frozen)
    casts = [r for r in log.rows if r[0].overloadpacket.__name__ == "_to_copy"]
    # x (fp32) cast 6 times, w once (cached), frozen 3 times
    assert len(casts) == 6 + 1 + 3


def test_cpu_autocast_is_untouched_outside_the_block():
    ln = torch.nn.LayerNorm(8).to(torch.bfloat16)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with cuda_autocast(torch.bfloat16):
        assert ln(x).dtype == torch.float32  # CUDA: layer_norm runs in fp32
        assert torch.is_autocast_enabled() and torch.get_autocast_dtype("cuda") == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ln(x).dtype == torch.bfloat16  # CPU autocast leaves layer_norm alone
        assert torch.cat([x, x.float()]).dtype == torch.float32
    assert not torch.is_autocast_enabled()
    assert policy_of("linear") == "lower_precision_fp" and policy_of("cat") is None
