"""Sequence shapes (memplan.plan.seq_shapes): the lengths file, the peak and typical batch per packing mode, and
the refusals. Pure Python: no torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memplan.errors import InvalidSetupError
from memplan.plan import seq_shapes as ss
from memplan.plan.setup import TrainSetup

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SMALL = str(FIXTURES / "seq_lengths_small.txt")  # 10 lengths, one of them (100) above seq_len 64
HIST = str(FIXTURES / "seq_lengths_hist.txt")


def _setup(**kw) -> TrainSetup:
    return TrainSetup(model="x", **{"batch_size": 4, "seq_len": 64, **kw})


def test_reads_lines_comments_and_histograms():
    small = ss.read_lengths(SMALL)
    assert small.count == 10 and small.lengths[0] == 7 and small.lengths[-1] == 100
    assert small.truncated(64) == 1
    assert dict(small.capped(64))[64] == 2  # 64 itself and 100 truncated to it
    hist = ss.read_lengths(HIST)
    assert hist.count == 1120 and hist.lengths == (96, 180, 256, 400, 512, 800, 1024, 1500, 3000)
    assert hist.quantile(0.5) == 256


@pytest.mark.parametrize("text, what", [("12\nabc\n", ":2: 'abc' is not an integer"),
                                        ("5 1 2\n", ":1: '5 1 2' has 3 fields"),
                                        ("0\n", ":1: length 0 must be >= 1"),
                                        ("8 -1\n", ":1: count -1 must be >= 0"),
                                        ("# nothing\n\n", "no sequence lengths")])
def test_bad_files_name_file_and_line(tmp_path, text, what):
    p = tmp_path / "lengths.txt"
    p.write_text(text)
    with pytest.raises(InvalidSetupError) as err:
        ss.read_lengths(str(p))
    msg = str(err.value)
    assert "\n" not in msg and str(p) in msg and what in msg


def test_missing_file_is_one_line():
    with pytest.raises(InvalidSetupError, match="cannot read"):
        ss.read_lengths("/nonexistent/lengths.txt")


def test_cache_follows_the_file(tmp_path):
    p = tmp_path / "l.txt"
    p.write_text("10\n20\n")
    assert ss.read_lengths(str(p)).count == 2
    p.write_text("10\n20\n30 5\n")
    os.utime(p, ns=(1, 2_000_000_000))  # a different mtime even on a coarse clock
    assert ss.read_lengths(str(p)).count == 7


def test_without_a_file_nothing_changes():
    s = _setup()
    assert ss.step_setup(None, s) is s and ss.typical_step_setup(None, s) is s
    assert not ss.masked_batch(s)


def test_padded_batches_pad_to_the_longest():
    shape = ss.sequence_shape(_setup(seq_len_file=SMALL))
    assert (shape.rows, shape.row_len, shape.peak_tokens) == (4, 64, 256)
    assert shape.masked  # only two sequences reach 64: the peak batch has padding rows
    assert shape.truncated == 1 and shape.file_count == 10 and shape.file_max == 100 and shape.file_median == 21
    step = ss.step_setup(None, _setup(seq_len_file=SMALL, seq_len=512))
    assert (step.batch_size, step.seq_len) == (4, 100)  # nothing truncated at 512: the longest is 100
    assert not ss.masked_batch(_setup(seq_len_file=SMALL, batch_size=2))  # two rows of 64 (one truncated)


def test_padding_free_is_one_row_of_the_longest_sequences():
    shape = ss.sequence_shape(_setup(packing="padding-free", seq_len_file=SMALL))
    assert (shape.rows, shape.row_len) == (1, 64 + 64 + 50 + 40)
    assert shape.typical_tokens < shape.peak_tokens and shape.masked
    plain = ss.sequence_shape(_setup(packing="padding-free"))
    assert (plain.rows, plain.row_len) == (1, 4 * 64)
    assert ss.mask_rows(ss.step_setup(None, _setup(packing="padding-free"))) == 1


def test_packed_follows_trl_best_fit_decreasing():
    # trl 1.16 data_utils.py _pack_bfd docstring example: lengths 5, 2, 3, 1 at seq_length 4 -> [4], [3, 1], [2]
    lengths = ss.LengthStats(path="-", lengths=(1, 2, 3, 5), counts=(1, 1, 1, 1))
    assert ss.packed_rows(lengths, 4) == ((2, 1), (4, 2))
    small = ss.read_lengths(SMALL)
    bins = ss.packed_rows(small, 64)
    assert sum(f * n for f, n in bins) == sum(length * n for length, n in small.capped(64))  # no token lost
    shape = ss.sequence_shape(_setup(packing="packed", seq_len_file=SMALL))
    assert (shape.rows, shape.row_len) == (1, 64 + 64 + 63 + 61)  # the four fullest bins, one row
    assert ss.sequence_shape(_setup(packing="packed")).row_len == 4 * 64


def test_typical_is_deterministic_and_at_most_the_peak():
    for packing in ss.PACKINGS:
        s = _setup(packing=packing, seq_len_file=HIST, seq_len=1024, batch_size=8)
        a, b = ss.sequence_shape(s), ss._shape.__wrapped__(packing, ss.read_lengths(HIST), 8, 1024)
        assert a == b and a.typical_tokens <= a.peak_tokens
        typ = ss.typical_step_setup(None, s)
        assert typ.batch_size * typ.seq_len == a.typical_tokens


def test_large_files_are_fast(tmp_path):
    import time

    p = tmp_path / "big.txt"
    p.write_text("\n".join(str(1 + (i * 7919) % 4000) for i in range(200_000)))
    t0 = time.perf_counter()
    shape = ss.sequence_shape(_setup(packing="packed", seq_len_file=str(p), seq_len=2048, batch_size=8))
    assert time.perf_counter() - t0 < 5 and shape.row_len == 8 * 2048


def test_refusals_are_one_line():
    from memplan.catalog.models import load_model

    with pytest.raises(InvalidSetupError, match="invalid packing 'bfd'; allowed: off, packed, padding-free"):
        ss.resolve_shape(_setup(packing="bfd"), None, attn="sdpa")
    bloom = load_model("bloom-560m")
    with pytest.raises(InvalidSetupError, match="allowed: --packing off"):
        ss.resolve_shape(_setup(packing="padding-free"), bloom, attn="eager")
    opt = load_model("opt-1.3b")
    with pytest.raises(InvalidSetupError, match="without position_ids.*allowed: attn flash_attention_2"):
        ss.resolve_shape(_setup(packing="packed"), opt, attn="sdpa")
    assert ss.resolve_shape(_setup(packing="packed"), opt, attn="flash_attention_2") == {}
    llama = load_model("llama-3.1-8b")
    with pytest.raises(InvalidSetupError, match="before 4.53.*allowed: attn flash_attention_2"):
        ss.resolve_shape(_setup(packing="packed", versions="transformers=4.48.3"), llama, attn="sdpa")
    assert ss.resolve_shape(_setup(packing="packed", versions="transformers=4.48.3"), llama,
                            attn="flash_attention_2") == {}
