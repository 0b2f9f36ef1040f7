"""The one training-step loop of ``memplan simulate`` and ``memplan profile``, as ``transformers.Trainer`` runs it.

A fresh batch per micro-step (``input_ids`` plus the collator's ``labels`` copy, int64, no padding, no attention
mask), ``loss = model(**batch).loss`` (``Trainer.compute_loss`` keeps only the loss: the output object with the
logits is dropped before backward), ``loss.backward()``, then ``optimizer.step()`` and
``zero_grad(set_to_none=True)`` in one phase (zero_grad allocates nothing). With gradient accumulation
(``setup.grad_accum`` > 1) two micro-batches run before each optimizer step: from the second on the memory is
the same (the earlier gradients held, the new ones added in place), so two show the peak of any number.
Sharing it is what makes a CPU run and its simulation the same computation, to the byte
(tests/measure/test_simulate.py).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from .recorder import StepRecorder

__all__ = ["make_batch", "forward_loss", "run_steps"]


def make_batch(spec, setup, *, device: str = "cpu") -> dict:
    """One batch as a data collator gives it: ``input_ids`` and ``labels`` (a copy), int64, no padding."""
    if getattr(setup, "packing", "off") != "off" or getattr(setup, "seq_len_file", None) is not None:
        from .shape_sim import shaped_batch  # padded / packed / padding-free batches (memplan.plan.seq_shapes)

        return shaped_batch(spec, setup, device=device)
    ids = torch.randint(0, spec.vocab_size, (setup.batch_size, setup.seq_len), device=device)
    return {"input_ids": ids, "labels": ids.clone()}


def forward_loss(model, batch, loss: str | None = None) -> torch.Tensor:
    """``Trainer.compute_loss``: the model output (logits included) is dropped, only the loss survives.
    ``loss="chunked"``: the chunked output projection and cross-entropy (``memplan.measure.loss_sim``)."""
    if loss == "chunked":
        from .loss_sim import chunked_forward_loss

        return chunked_forward_loss(model, batch)
    return model(**batch).loss


def run_steps(model, optimizer, recorder: StepRecorder, spec, setup, *, steps: int, device: str = "cpu",
              autocast: Callable = nullcontext, on_step: Callable[[int], None] | None = None,
              backward: Callable | None = None) -> int:
    """``steps`` training steps, each phase inside ``recorder.phase``; returns the number of completed steps.

    ``autocast`` is a context-manager factory the forward runs under (mixed precision); ``on_step(step)`` is
    called after each completed step (progress, Ctrl-C checks); ``backward(loss)`` replaces ``loss.backward()``
    (DeepSpeed's ``engine.backward``)."""
    done = 0
    micro_steps = min(getattr(setup, "grad_accum", 1), 2)
    for step in range(1, steps + 1):
        for _ in range(micro_steps):
            batch = None  # the earlier micro-batch's ids go before the next are made
            batch = make_batch(spec, setup, device=device)
            recorder.register_inputs(batch)
            with recorder.phase("forward", step):
                with autocast():
                    loss = forward_loss(model, batch, getattr(setup, "loss", None))
            with recorder.phase("backward", step):
                loss.backward() if backward is None else backward(loss)
            del loss  # Trainer.training_step returns loss.detach(): the graph dies with the step's loss
        with recorder.phase("optimizer_step", step):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        del batch
        done = step
        if on_step is not None:
            on_step(step)
    return done
