"""Fake-tensor routing for transformers 4.x's Mixtral experts loop (``MixtralSparseMoeBlock.forward``).

transformers < 5 routes tokens with ``idx, top_x = torch.where(expert_mask[expert_idx])`` for each expert
(models/mixtral/modeling_mixtral.py, 4.48.3:143-150): a data-dependent shape, which a fake tensor cannot have
("DynamicOutputShapeException: aten.nonzero"). ``balanced_routing`` answers that one-argument ``torch.where``
on a fake (top_k, tokens) mask with index tensors of a fixed size: the k x tokens routed slots split as evenly
as the experts allow, expert after expert (the block calls it once per expert, in order). The real call makes a
(n, 2) int64 ``nonzero`` result and returns its two columns; so does this one.

Memory does not depend on the split: every routed token's expert tensors are saved once, whatever expert holds
them (``memplan.plan.activations``, "per routed token"), so an even split is the sum any routing gives; what it
does change is the size of one expert's transient in backward, which the estimate bounds the same way.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["balanced_routing"]


@contextlib.contextmanager
def balanced_routing(spec):
    """While active, ``torch.where(mask)`` on a fake 2-D integer mask of shape (top_k, tokens) returns a balanced
    share of the routed slots (module docstring). Only for MoE specs on transformers without fused experts."""
    experts = spec.num_experts
    if experts <= 1:
        yield
        return
    orig = torch.where
    calls = {"n": 0}

    def where(condition, *args, **kwargs):
        if args or kwargs or not isinstance(condition, torch._subclasses.FakeTensor) or condition.dim() != 2:
            return orig(condition, *args, **kwargs)
        slots = condition.shape[0] * condition.shape[1]  # top_k x tokens routed slots
        i = calls["n"] % experts
        calls["n"] += 1
        n = slots * (i + 1) // experts - slots * i // experts
        nonzero = torch.empty((n, 2), dtype=torch.int64, device=condition.device)
        return nonzero.unbind(1)

    torch.where = where
    try:
        yield
    finally:
        torch.where = orig
