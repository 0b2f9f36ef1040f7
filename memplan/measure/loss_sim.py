"""The losses of ``--loss`` that ``memplan simulate`` runs itself (``memplan.plan.loss`` has the analytic side).

``chunked``: torchtune 0.6.1's chunked output + ``CEWithChunkedOutputLoss`` (modules/transformer.py
``TransformerDecoder.chunked_output``, modules/loss/ce_chunked_output_loss.py) applied to the transformers model:
the inner model's final hidden states (the base model without its lm_head, so no full logits are made), the lm_head
on each of 8 chunks along the sequence (``hidden.chunk(8, dim=1)``), Gemma-2's soft-capping per chunk as its
``forward`` does it, then per chunk ``F.cross_entropy(logits.float(), labels, reduction="sum")``, summed and divided
by the number of labelled tokens. Labels are shifted as transformers' ``ForCausalLMLoss`` shifts them (pad with
-100, drop the first). The hidden states stay alive until the loss returns, as they do inside transformers'
``XForCausalLM.forward`` (the default loss' reference).

``liger``: Liger's fused linear cross-entropy is a Triton kernel; it cannot run on fake CPU tensors, so simulate
refuses it (``check_simulable``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memplan.errors import InvalidSetupError
from memplan.plan.loss import CHUNKED_OUTPUT_CHUNKS

__all__ = ["check_simulable", "chunked_forward_loss"]

_IGNORE_INDEX = -100  # transformers loss_utils.py / torchtune CEWithChunkedOutputLoss ignore_index


def check_simulable(setup) -> None:
    """Refuse what ``memplan simulate`` cannot run, with why (one line)."""
    if (setup.loss or "default") == "liger":
        raise InvalidSetupError("loss 'liger' cannot be simulated: Liger's fused linear cross-entropy is a Triton "
                                "(GPU) kernel that does not run on fake CPU tensors; use memplan estimate for it, or "
                                "simulate loss 'default' or 'chunked'")


def chunked_forward_loss(model, batch, chunks: int = CHUNKED_OUTPUT_CHUNKS) -> torch.Tensor:
    """The loss of ``batch`` through the chunked output projection and cross-entropy (module docstring)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper -> transformers
    inner = base.base_model  # PreTrainedModel.base_model: the decoder stack without the lm_head
    head = base.get_output_embeddings()
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = inner(**inputs, use_cache=False).last_hidden_state
    softcap = getattr(base.config, "final_logit_softcapping", None)
    logits = []
    for part in hidden.chunk(chunks, dim=1):
        out = head(part)
        if softcap:  # modeling_gemma2.py Gemma2ForCausalLM.forward
            out = torch.tanh(out / softcap) * softcap
        logits.append(out)
    shifted = F.pad(labels, (0, 1), value=_IGNORE_INDEX)[..., 1:].contiguous()
    total_elements = (shifted != _IGNORE_INDEX).sum()
    total_loss = 0.0
    for out, target in zip(logits, shifted.chunk(chunks, dim=1)):
        total_loss = total_loss + F.cross_entropy(out.reshape(-1, out.size(-1)).float(), target.reshape(-1),
                                                  ignore_index=_IGNORE_INDEX, reduction="sum")
    del logits, hidden  # the recipe's ``del logits``: only the loss survives into backward
    return total_loss / total_elements
