"""The batch a collator gives for a setup's sequence shape (``--packing``, ``--seq-len-file``), for ``simulate``.

The peak batch of ``memplan.plan.seq_shapes`` as the real collator builds it, so that the simulation runs
transformers' own code for it:

- padded (``off`` with a lengths file): ``batch_size`` rows padded on the right to the longest, with the int64
  ``attention_mask`` (0 on padding) and ``labels`` -100 on padding (transformers ``DataCollatorForLanguageModeling``,
  TRL's collator without padding_free). A row shorter than the longest makes transformers build a padding mask.
- ``padding-free`` / ``packed``: one row of every token, ``position_ids`` restarting at 0 at each sequence (packed:
  at each TRL bin, trl 1.16 sft_trainer.py ``DataCollatorForLanguageModeling`` with padding_free), no attention
  mask, ``labels`` -100 at each sequence start. transformers 5.24 ``find_packed_sequence_indices`` then finds the
  sequences and builds the block-diagonal mask for sdpa/eager.

transformers reads the values of ``position_ids`` and of the padding mask (``find_packed_sequence_indices``,
``_ignore_causal_mask_sdpa``), which fake tensors do not have (and real tensors become fake at their first op
under the fake mode): for the tensors of these batches the two checks make their temporaries and give the real
batch's answer (``_install_mask_answers``).
"""

from __future__ import annotations

import weakref

import torch

from memplan.plan.seq_shapes import packed_rows, read_lengths, sequence_shape

__all__ = ["batch_lengths", "shaped_batch"]


def batch_lengths(setup) -> tuple[int, ...]:
    """The lengths of the segments (sequences; packed: TRL bins) of the peak batch, longest first."""
    shape = sequence_shape(setup)
    stats = read_lengths(setup.seq_len_file) if setup.seq_len_file is not None else None
    if setup.packing == "packed":
        hist = packed_rows(stats, setup.seq_len) if stats is not None else ((setup.seq_len, setup.batch_size),)
    elif stats is not None:
        hist = stats.capped(setup.seq_len)
    else:
        hist = ((setup.seq_len, setup.batch_size),)
    out: list[int] = []
    for value, n in reversed(hist):
        out += [value] * min(n, setup.batch_size - len(out))
        if len(out) == setup.batch_size:
            break
    if setup.packing == "packed" and len(out) == 1 and shape.masked and out[0] > 1:
        # one bin of several sequences: which ones does not change the memory, only that the row is split
        out = [out[0] - out[0] // 2, out[0] // 2]
    return tuple(out)


def shaped_batch(spec, setup, *, device: str = "cpu") -> dict:
    """The peak batch for ``setup``'s shape, as its collator gives it (module docstring)."""
    lengths = batch_lengths(setup)
    if setup.packing == "off":
        rows, row_len = len(lengths), max(lengths)
        ids = torch.randint(0, spec.vocab_size, (rows, row_len), device=device)
        batch = {"input_ids": ids, "labels": ids.clone()}
        # flash_attention_2 unpads by the mask inside flash_attn (not simulated: memplan's flash stand-in takes
        # the rows as they are); sdpa and eager get the padding mask
        if any(n < row_len for n in lengths) and setup.attn != "flash_attention_2":
            mask = torch.ones((rows, row_len), dtype=torch.long, device=device)
            for i, n in enumerate(lengths):
                mask[i, n:] = 0
            batch["attention_mask"] = _watched(mask)
        return batch
    total = sum(lengths)
    ids = torch.randint(0, spec.vocab_size, (1, total), device=device)
    position_ids = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    if len(lengths) > 1:
        _watched(position_ids)  # a fake tensor has no values: transformers' check gets the answer
    # labels: a copy of input_ids with -100 at each sequence start (memory: the same int64 row)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": position_ids}


# Batch tensors whose values stand for a padded mask / restarting position ids (fake tensors have no values):
# id -> weak reference, alive while the batch is.
_WATCHED: dict[int, weakref.ref] = {}


def _watched(t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch._subclasses.FakeTensor):  # a real run (memplan profile): transformers reads values
        return t
    for key in [k for k, r in _WATCHED.items() if r() is None]:
        del _WATCHED[key]
    _WATCHED[id(t)] = weakref.ref(t)
    _install_mask_answers()
    return t


def _is_watched(t) -> bool:
    r = _WATCHED.get(id(t))
    return r is not None and r() is t


def _live_padded(shape) -> bool:
    return any(r() is not None and r().dim() == 2 and tuple(r().shape) == tuple(shape) for r in _WATCHED.values())


def _install_mask_answers() -> None:
    """Give transformers' value checks the answers of the real batch for the watched fake tensors, after making
    the temporaries the real checks make: ``find_packed_sequence_indices`` (restarting position_ids: packed)
    and ``_ignore_causal_mask_sdpa`` (a padding mask with zeros: not ignorable). Installed over whatever is there
    (``memplan.measure.cuda_semantics.fake_fidelity_patches`` restores transformers' own on exit); for any other
    tensor the previous function answers."""
    try:
        from transformers import masking_utils as mu
    except ImportError:  # transformers < 4.53: packed sequences are refused with sdpa/eager (seq_shapes)
        return
    if getattr(mu.find_packed_sequence_indices, "memplan_shapes", False):
        return
    prior_find = mu.find_packed_sequence_indices
    prior_ignore = getattr(mu, "_ignore_causal_mask_sdpa")

    def find_packed_sequence_indices(position_ids):
        if not _is_watched(position_ids):
            return prior_find(position_ids)
        first_dummy_value = position_ids[:, :1] - 1
        position_diff = torch.diff(position_ids, prepend=first_dummy_value, dim=-1)
        packed_sequence_mask = (position_diff != 1).cumsum(-1)
        (packed_sequence_mask[:, -1] == 0).all()  # the real check's temporaries; its answer: packed
        return packed_sequence_mask

    def ignore_causal_mask_sdpa(padding_mask, *args, **kwargs):
        if padding_mask is not None and _live_padded(padding_mask.shape):
            return False  # the batch has padding: transformers builds the mask
        return prior_ignore(padding_mask, *args, **kwargs)

    find_packed_sequence_indices.memplan_shapes = True
    mu.find_packed_sequence_indices = find_packed_sequence_indices
    setattr(mu, "_ignore_causal_mask_sdpa", ignore_causal_mask_sdpa)
