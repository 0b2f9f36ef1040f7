"""Sequence shapes (``--packing``, ``--seq-len-file``): the rows and row length of the batches a step sees.

``seq_len`` stays the truncation length (TRL ``SFTConfig.max_length``). What a batch looks like then depends on
the collator (docs/adapters-and-savers.md, "Sequence shapes"):

- ``off``: padded batches. The default collators pad each batch to its longest sequence (transformers
  ``DataCollatorForLanguageModeling`` / TRL's ``DataCollatorForLanguageModeling`` without padding_free), so a batch
  is ``batch_size`` rows x its longest length. Without a lengths file every sequence is taken as ``seq_len`` long.
- ``packed``: TRL ``packing=True`` with its default ``packing_strategy="bfd"``: ``pack_dataset`` bins the truncated
  sequences into examples of at most ``seq_len`` tokens (best fit decreasing, trl 1.16 data_utils.py ``_pack_bfd``),
  and ``SFTTrainer`` then switches padding_free on (sft_trainer.py: ``padding_free = args.padding_free or
  (args.packing and args.packing_strategy in {"bfd", "bfd_split"})``): the collator concatenates the
  ``batch_size`` packed examples into ONE row with ``position_ids`` restarting at every sequence and no
  attention mask. ("wrapped" packing gives plain rows of ``seq_len``: ``--packing off`` without a file.)
- ``padding-free``: TRL ``padding_free=True`` / transformers ``DataCollatorWithFlattening``: the ``batch_size``
  sequences concatenated into one row, ``position_ids`` restarting at each.

A row holding several sequences is one sequence to the linear layers, but not to attention: transformers 5.24
(masking_utils.py ``find_packed_sequence_indices``, ``create_causal_mask``) sees the restarting position_ids and,
for sdpa and eager, builds a block-diagonal (rows, 1, T, T) mask (not an expanded view: it depends on the row);
flash_attention_2 takes the variable-length path (modeling_flash_attention_utils.py ``_flash_attention_forward``)
and needs no mask. A padded batch with a short row has a padding mask, also materialised (rows, 1, L, L) for sdpa.

The lengths file: one length per line, or ``length count`` pairs; ``#`` starts a comment. Lengths above
``seq_len`` are truncated to it. The peak is the largest batch the sampler can form; the sampler is assumed
random (the Trainer's default ``RandomSampler``), so any ``batch_size`` sequences can meet in one batch.
The typical step is the median, over 1,001 batches drawn by a seeded random sampler, of the batch's token count.
"""

from __future__ import annotations

import os
from bisect import bisect_left, insort
from dataclasses import dataclass, replace
from functools import lru_cache

from memplan.errors import InvalidSetupError

__all__ = ["PACKINGS", "SequenceShape", "LengthStats", "resolve_shape", "step_setup", "typical_step_setup",
           "sequence_shape", "read_lengths", "masked_batch", "mask_rows", "packed_rows"]

PACKINGS = ("off", "packed", "padding-free")
# transformers 4.53 added masking_utils (find_packed_sequence_indices): before it, sdpa and eager attend across the
# sequences of a flattened row (memplan.measure.cuda_semantics notes the same boundary).
_PACKED_MASK_SINCE = "4.53.0"
# Models whose transformers code passes no position_ids to attention nor to its mask (bloom: ALiBi, modeling_bloom.py
# create_causal_mask(... no position_ids); bert: an encoder): packed sequences would attend to each other.
_NO_POSITION_IDS = frozenset({"bloom", "bert"})
# ... and those that pass them to attention (flash_attention_2's variable-length path) but not to the mask:
# transformers 5.24 models/opt/modeling_opt.py OPTDecoder.forward calls create_causal_mask(config, inputs_embeds,
# attention_mask, cache), so sdpa/eager get a plain causal mask over the whole row.
_MASK_WITHOUT_POSITION_IDS = frozenset({"opt"})
_TYPICAL_DRAWS = 1001  # batches the typical step is the median of
_TYPICAL_SEED = 0


@dataclass(frozen=True)
class LengthStats:
    """What a lengths file holds: a histogram of sequence lengths (before truncation)."""

    path: str
    lengths: tuple[int, ...]  # distinct lengths, ascending
    counts: tuple[int, ...]  # how many sequences have each

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> int:
        """The length at quantile ``q`` (0..1; the lower median at 0.5)."""
        target = max(0, min(self.count - 1, int(q * (self.count - 1))))
        seen = 0
        for length, n in zip(self.lengths, self.counts):
            seen += n
            if seen > target:
                return length
        return self.lengths[-1]

    def capped(self, seq_len: int) -> tuple[tuple[int, int], ...]:
        """(length, count) with every length above ``seq_len`` truncated to it, ascending."""
        out: dict[int, int] = {}
        for length, n in zip(self.lengths, self.counts):
            out[min(length, seq_len)] = out.get(min(length, seq_len), 0) + n
        return tuple(sorted(out.items()))

    def truncated(self, seq_len: int) -> int:
        return sum(n for length, n in zip(self.lengths, self.counts) if length > seq_len)


@dataclass(frozen=True)
class SequenceShape:
    """The batch shapes of a setup, for the CLI: the peak step (rows x row length) and the typical step."""

    packing: str
    rows: int  # the peak step's batch rows
    row_len: int  # ... and row length (tokens per row)
    peak_tokens: int  # rows x row_len
    typical_rows: int
    typical_row_len: int
    typical_tokens: int
    sequences_per_step: int  # sequences in a peak batch (packed: an estimate, batch_size bins)
    masked: bool  # transformers builds an explicit (rows, 1, T, T) attention mask for the peak batch (sdpa/eager)
    file: str | None = None
    file_count: int = 0
    file_min: int = 0
    file_median: int = 0
    file_max: int = 0
    truncated: int = 0  # sequences longer than seq_len, truncated to it

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def read_lengths(path: str) -> LengthStats:
    """The parsed lengths file, cached by path, modification time and size (fit re-reads it per candidate)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise InvalidSetupError(f"seq_len_file {path!r}: cannot read it ({e.strerror}); give a file with one "
                                f"sequence length per line or 'length count' pairs") from None
    return _parse(os.fspath(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=16)
def _parse(path: str, mtime_ns: int, size: int) -> LengthStats:
    hist: dict[int, int] = {}
    try:
        fh = open(path, encoding="utf-8")
    except OSError as e:
        raise InvalidSetupError(f"seq_len_file {path!r}: cannot read it ({e.strerror})") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.replace(",", " ").split()
            if len(parts) > 2:
                raise InvalidSetupError(f"seq_len_file {path}:{lineno}: {line!r} has {len(parts)} fields; allowed: "
                                        f"'length' or 'length count'")
            try:
                values = [int(p) for p in parts]
            except ValueError:
                raise InvalidSetupError(f"seq_len_file {path}:{lineno}: {line!r} is not an integer length (or "
                                        f"'length count' pair)") from None
            length, count = values[0], values[1] if len(values) == 2 else 1
            if length < 1:
                raise InvalidSetupError(f"seq_len_file {path}:{lineno}: length {length} must be >= 1")
            if count < 0:
                raise InvalidSetupError(f"seq_len_file {path}:{lineno}: count {count} must be >= 0")
            if count:
                hist[length] = hist.get(length, 0) + count
    if not hist:
        raise InvalidSetupError(f"seq_len_file {path}: no sequence lengths in it; give one length per line or "
                                f"'length count' pairs")
    items = sorted(hist.items())
    return LengthStats(path=path, lengths=tuple(k for k, _ in items), counts=tuple(v for _, v in items))


def _has_packed_masks(versions: str | None) -> bool:
    from .versions import parse_version, stack_of  # lazy: versions is imported by setup, which imports us

    return stack_of(versions).release("transformers") >= parse_version(_PACKED_MASK_SINCE)


def resolve_shape(setup, spec, *, attn: str) -> dict:
    """Check ``packing`` and ``seq_len_file`` (parsing the file: a bad line fails here, naming file and line)."""
    if setup.packing not in PACKINGS:
        raise InvalidSetupError(f"invalid packing {setup.packing!r}; allowed: {', '.join(PACKINGS)}")
    if setup.seq_len_file is not None:
        read_lengths(setup.seq_len_file)
    if setup.packing != "off":
        if spec.model_type in _NO_POSITION_IDS:
            raise InvalidSetupError(
                f"packing {setup.packing!r}: transformers' {spec.model_type} code passes no position_ids to its "
                f"attention, so the sequences of a flattened row would attend to each other; allowed: --packing off")
        if attn in ("sdpa", "eager") and spec.model_type in _MASK_WITHOUT_POSITION_IDS:
            raise InvalidSetupError(
                f"packing {setup.packing!r} with {attn} attention: transformers' {spec.model_type} code builds its "
                f"mask without position_ids, so the sequences of a row would attend to each other; allowed: "
                f"attn flash_attention_2, or --packing off")
        if attn in ("sdpa", "eager") and not _has_packed_masks(setup.versions):
            raise InvalidSetupError(
                f"packing {setup.packing!r} with {attn} attention: transformers before 4.53 builds no "
                f"block-diagonal mask from position_ids, so the sequences would attend to each other; allowed: "
                f"attn flash_attention_2, or transformers >= 4.53")
    return {}


def packed_rows(stats: LengthStats | None, seq_len: int) -> tuple[tuple[int, int], ...]:
    """TRL's best-fit-decreasing bins (trl 1.16 data_utils.py ``_pack_bfd``, truncate mode) as (fill, count),
    ascending: each length, longest first, goes to the bin with the least space that still fits it, else to a new
    bin. Bins with the same space are interchangeable, so whole groups move at once (exact, and fast on a
    histogram). Without a file: full bins."""
    if stats is None:
        return ((seq_len, 1),)
    spaces: list[int] = []  # distinct spaces > 0 with open bins, ascending
    bins_at: dict[int, int] = {}  # space -> number of bins with it (0: full bins)
    for length, n in reversed(stats.capped(seq_len)):
        while n:
            i = bisect_left(spaces, length)
            if i == len(spaces):  # no open bin fits: n new ones
                _add_bins(spaces, bins_at, seq_len - length, n)
                break
            space = spaces[i]
            k = min(n, bins_at[space])
            bins_at[space] -= k
            if not bins_at[space]:
                del bins_at[space]
                spaces.pop(i)
            _add_bins(spaces, bins_at, space - length, k)
            n -= k
    return tuple(sorted((seq_len - space, k) for space, k in bins_at.items()))


def _add_bins(spaces: list[int], bins_at: dict[int, int], space: int, n: int) -> None:
    if space not in bins_at:
        if space > 0:
            insort(spaces, space)
        bins_at[space] = 0
    bins_at[space] += n


def _largest_sum(hist: tuple[tuple[int, int], ...], k: int) -> tuple[int, int]:
    """The sum of the ``k`` largest values of a (value, count) histogram, and how many values that took."""
    total = taken = 0
    for value, n in reversed(hist):
        m = min(n, k - taken)
        total += m * value
        taken += m
        if taken == k:
            break
    return total, taken


def _typical(hist: tuple[tuple[int, int], ...], k: int, combine) -> int:
    """The median over ``_TYPICAL_DRAWS`` seeded random batches of ``k`` values (drawn with replacement: a
    dataset is much larger than a batch) of ``combine(batch)``: deterministic."""
    values = [v for v, _ in hist]
    cum, run = [], 0
    for _, n in hist:
        run += n
        cum.append(run)
    import random  # (only for a lengths file)

    rng = random.Random(_TYPICAL_SEED)
    draws = rng.choices(values, cum_weights=cum, k=k * _TYPICAL_DRAWS)
    per_batch = sorted(combine(draws[i * k:(i + 1) * k]) for i in range(_TYPICAL_DRAWS))
    return per_batch[_TYPICAL_DRAWS // 2]


def sequence_shape(setup) -> SequenceShape:
    """The peak and typical batch shapes of ``setup`` (its ``packing``, ``seq_len_file``, ``batch_size``,
    ``seq_len``); see the module docstring for the rules."""
    stats = read_lengths(setup.seq_len_file) if setup.seq_len_file is not None else None
    return _shape(setup.packing, stats, setup.batch_size, setup.seq_len)


@lru_cache(maxsize=1024)
def _shape(packing: str, stats: LengthStats | None, batch: int, seq_len: int) -> SequenceShape:
    hist = stats.capped(seq_len) if stats is not None else ((seq_len, batch),)
    count = sum(n for _, n in hist)
    if packing == "off":
        # rows padded to the batch's longest sequence; a shorter row means a padding mask
        row_len = hist[-1][0]
        typical_len = _typical(hist, batch, max) if stats is not None else row_len
        masked = batch > 1 and hist[-1][1] < batch
        rows, typical_rows, seqs = batch, batch, batch
        peak, typical = batch * row_len, batch * typical_len
    elif packing == "padding-free":
        peak, seqs = _largest_sum(hist, batch)  # the batch_size longest sequences, one row
        typical = _typical(hist, batch, sum) if stats is not None else peak
        rows = typical_rows = 1
        row_len, typical_len = peak, typical
        masked = seqs > 1
    else:  # packed: batch_size TRL bfd bins, flattened into one row (padding_free)
        bins = packed_rows(stats, seq_len)
        if stats is None:
            bins = ((seq_len, batch),)
        peak, _ = _largest_sum(bins, batch)
        typical = _typical(bins, batch, sum) if stats is not None else peak
        rows = typical_rows = 1
        row_len, typical_len = peak, typical
        seqs = count if stats is not None and count < 2 else max(batch, 2)
        # one row of several sequences (a lone bin of one truncated sequence is the exception, ignored)
        masked = stats is None or batch > 1 or len(hist) > 1 or hist[-1][0] < seq_len
    out = SequenceShape(packing=packing, rows=rows, row_len=row_len, peak_tokens=rows * row_len,
                        typical_rows=typical_rows, typical_row_len=typical_len, typical_tokens=typical,
                        sequences_per_step=seqs, masked=masked)
    if stats is not None:
        out = replace(out, file=stats.path, file_count=stats.count, file_min=stats.lengths[0],
                      file_median=stats.quantile(0.5), file_max=stats.lengths[-1], truncated=stats.truncated(seq_len))
    return out


# step setups handed out by step_setup -> whether their batch has an explicit mask (they no longer carry the
# batch_size and seq_len the shape came from). They keep packing and seq_len_file, so a plain setup of the same
# rows x row length never matches one; a user setup equal to a step setup has the same batch (and mask), except
# padding-free at batch_size 1 with seq_len equal to a step's whole row (a single sequence: no mask).
_STEP_MASKED: dict = {}
_STEP_MAX = 4096


def step_setup(spec, setup):
    """``setup`` at the rows and row length of the largest batch a step sees (what the arithmetic uses)."""
    if (setup.packing == "off" and setup.seq_len_file is None) or setup in _STEP_MASKED:
        return setup  # plain, or already a step's setup (the typical step's, estimated as it is)
    shape = sequence_shape(setup)
    return _remember(replace(setup, batch_size=shape.rows, seq_len=shape.row_len), shape.masked)


def typical_step_setup(spec, setup):
    """``setup`` at the rows and row length of the typical step (``SequenceShape.typical_*``)."""
    if setup.packing == "off" and setup.seq_len_file is None:
        return setup
    shape = sequence_shape(setup)
    typical_masked = shape.masked and (setup.packing != "off" or shape.typical_row_len < shape.row_len)
    return _remember(replace(setup, batch_size=shape.typical_rows, seq_len=shape.typical_row_len), typical_masked)


def _remember(step, masked: bool):
    if len(_STEP_MASKED) >= _STEP_MAX:
        _STEP_MASKED.clear()
    _STEP_MASKED[step] = masked
    return step


def masked_batch(setup) -> bool:
    """Whether transformers builds an explicit attention mask for ``setup``'s (peak) batch: several sequences in
    one row (block-diagonal), or padded rows (a padding mask); for a setup returned by ``step_setup``, its batch.
    The mask is materialised for sdpa and eager, not for flash_attention_2 (module docstring)."""
    hit = _STEP_MASKED.get(setup)
    if hit is not None:
        return hit
    if setup.packing == "off" and setup.seq_len_file is None:
        return False
    return sequence_shape(setup).masked


def mask_rows(setup) -> int:
    """The batch dimension of the model-level mask: a packed or padding mask differs per row, so it is
    (rows, 1, T, T); the plain causal (sliding-window) mask is (1, 1, T, T) expanded as a view."""
    return setup.batch_size if masked_batch(setup) else 1
