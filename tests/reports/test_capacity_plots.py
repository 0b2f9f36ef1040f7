"""The capacity curves figure fits its axes to the data: the y axis ends a little above the largest card's limit,
the x axes at the last point on the plot or the last line leaving the top, batch ticks only where there are
points, and every line that leaves the top has one label there, the labels apart. Logic, not pixels."""

from __future__ import annotations

import pytest

from memplan.reports import capacity_plots as cp
from memplan.reports.capacity import DEFAULT_GPUS, CapacityRow, CurvePoint, capacity_rows, peak_curves
from memplan.units import GiB

pytestmark = pytest.mark.extras("matplotlib")

SMALL_CARDS = ("rtx-3060-12gb", "rtx-4090")


def _cards(gpus) -> list[CapacityRow]:
    """One row per card (what ``figures`` hands the curves figure): their limits."""
    return list({r.gpu_id: r for r in capacity_rows(["llama-3.2-1b"], gpus, [512])}.values())


@pytest.fixture(scope="module")
def default_cards():
    return _cards(DEFAULT_GPUS)


@pytest.fixture(scope="module")
def small_cards():
    return _cards(SMALL_CARDS)


@pytest.fixture(scope="module")
def curves():
    return {m: peak_curves(m, gpu="rtx-4090") for m in ("llama-3.1-8b", "llama-3.1-70b")}


def _card(gib: float) -> CapacityRow:
    return CapacityRow(model="m", model_params=1, gpu=f"card {gib}", gpu_id=f"c{gib}", seq_len=512, status="fits",
                       gpu_total_bytes=int(gib * GiB), usable_bytes=int(gib * GiB), budget_bytes=int(gib * GiB))


def _line(axis: str, bits: int, ckpt: bool, peaks: dict[int, float]) -> list[CurvePoint]:
    return [CurvePoint("m", axis, bits, ckpt, x if axis == "batch" else 1, x if axis == "seq_len" else 512,
                       int(gib * GiB)) for x, gib in peaks.items()]


def _on_plot(points, axis: str, top: float) -> set[int]:
    return {x for xy in cp.curve_series(points, axis).values() for x, y in xy if y <= top}


def _check_panel(points, fit: cp.PanelFit, top: float) -> None:
    """The invariants of a fitted panel, whatever the numbers."""
    on_plot = _on_plot(points, fit.axis, top)
    assert set(fit.ticks) == on_plot  # a tick where a point is on the plot, and only there
    assert fit.x_max == max([max(on_plot)] + [e.x for e in fit.exits])
    series = cp.curve_series(points, fit.axis)
    leaving = {key for key, xy in series.items() if max(y for _, y in xy) > top}
    assert sorted(e.key for e in fit.exits) == sorted(leaving)  # exactly one label per line that leaves the top
    for e in fit.exits:
        xy = series[e.key]
        assert e.label.startswith(f"{e.key[0]}-bit" + (" ckpt" if e.key[1] else ""))
        assert e.above == (xy[0][1] > top) == ("≥" in e.label)
        before = [y for x, y in xy if x < e.x]  # the line is on the plot up to its exit and above it just after
        assert all(y <= top for y in before)
        assert min(y for x, y in xy if x >= e.x) > top or e.x in dict(xy)


def test_y_axis_ends_a_little_above_the_largest_card(default_cards, small_cards, curves):
    points = curves["llama-3.1-8b"]
    for cards in (default_cards, small_cards):
        limit = max(c.budget_bytes for c in cards) / GiB
        top, _, _ = cp.curve_limits(points, cards)
        assert limit < top <= limit * 1.1
    top, _, _ = cp.curve_limits(points, [])  # no cards: the highest peak
    assert top == pytest.approx(max(p.peak_bytes for p in points) / GiB * cp.Y_MARGIN)


def test_llama_8b_seq_axis_ends_at_its_last_point_under_the_largest_card(default_cards, curves):
    points = curves["llama-3.1-8b"]
    top, batch, seq = cp.curve_limits(points, default_cards)
    for fit in (batch, seq):
        _check_panel(points, fit, top)
    # The grid runs to 32k tokens; the axis runs to the farthest point on the plot or exit, not past it.
    last = max(_on_plot(points, "seq_len", top))
    grid = sorted({p.seq_len for p in points if p.axis == "seq_len"})
    assert seq.x_max < (grid[grid.index(last) + 1] if last != grid[-1] else 2 * last)


def test_seq_axis_ends_well_before_32k_when_the_cards_are_small(small_cards, curves):
    points = curves["llama-3.1-8b"]
    top, batch, seq = cp.curve_limits(points, small_cards)
    for fit in (batch, seq):
        _check_panel(points, fit, top)
    assert seq.x_max < 16384 and max(seq.ticks) < 16384  # every line has left the plot by then
    assert 64 not in batch.ticks and batch.x_max < 64  # no tick without a point


def test_llama_70b_panels(default_cards, curves):
    points = curves["llama-3.1-70b"]
    top, batch, seq = cp.curve_limits(points, default_cards)
    for fit in (batch, seq):
        _check_panel(points, fit, top)
        assert any(e.above for e in fit.exits)  # 16-bit 70B starts above an 80 GB card
    assert seq.x_max < 32768 and 64 not in batch.ticks


def test_every_batch_tick_has_a_point_on_the_plot():
    points = (_line("batch", 16, False, {1: 10, 2: 20, 4: 40, 8: 80, 16: 160, 32: 320, 64: 640})
              + _line("batch", 16, True, {1: 8, 2: 9, 4: 11, 8: 15, 16: 23, 32: 39, 64: 71}))
    top, batch, _ = cp.curve_limits(points, [_card(24), _card(40)])
    assert top == pytest.approx(40 * cp.Y_MARGIN)
    assert batch.ticks == [1, 2, 4, 8, 16, 32]  # 64 (71 GiB) is off the plot: no tick
    assert [e.key for e in batch.exits] == [(16, False), (16, True)]
    assert 4 < batch.exits[0].x < 8 and 32 < batch.exits[1].x < 64
    assert batch.x_max == batch.exits[1].x
    _check_panel(points, batch, top)


def test_exit_x_is_where_the_drawn_segment_crosses_the_top():
    assert cp.exit_x([(1, 10.0), (4, 30.0)], 20.0) == pytest.approx(2.0)  # half way on a log2 axis
    assert cp.exit_x([(256, 10.0), (512, 20.0), (1024, 40.0)], 30.0) == pytest.approx(512 * 2 ** 0.5)
    assert cp.exit_x([(8, 50.0), (16, 90.0)], 40.0) == 8.0  # starts above: at its first point
    assert cp.exit_x([(1, 5.0), (2, 40.0)], 40.0) is None  # at the top is on the plot
    assert cp.exit_x([], 40.0) is None


def test_a_line_above_the_whole_panel_gets_one_label_with_its_lowest_peak():
    points = (_line("seq_len", 16, False, {256: 150.4, 512: 170, 1024: 200})
              + _line("seq_len", 4, True, {256: 90.9, 512: 95})
              + _line("seq_len", 4, False, {256: 30, 512: 60}))
    top, _, seq = cp.curve_limits(points, [_card(80)])
    labels = {e.key: e.label for e in seq.exits}
    assert labels == {(16, False): "16-bit ≥150 GiB", (4, True): "4-bit ckpt ≥90 GiB"}  # floor: truthful
    assert seq.ticks == [256, 512] and seq.x_max == 512
    _check_panel(points, seq, top)


def test_nothing_on_the_plot_keeps_the_grid_and_labels_every_line():
    points = _line("batch", 16, False, {1: 300, 2: 400}) + _line("batch", 4, True, {1: 100, 2: 120})
    top, batch, seq = cp.curve_limits(points, [_card(24)])
    assert batch.ticks == [1, 2] and len(batch.exits) == 2 and all(e.above for e in batch.exits)
    assert seq.ticks == [] and seq.exits == []  # an empty panel does not fail


@pytest.mark.parametrize("wanted,widths", [
    ([10, 12, 13, 40, 41], [20, 30, 10, 25, 25]),
    ([0, 0, 0, 0], [50, 60, 40, 70]),
    ([290, 295, 299], [30, 30, 30]),
    ([5, 100, 200], [10, 10, 10]),
])
def test_spread_keeps_labels_apart_and_inside(wanted, widths):
    gap, lo, hi = 8.0, 0.0, 300.0
    out = cp.spread(wanted, gap, widths, lo, hi)
    assert len(out) == len(wanted)
    for (a, wa), (b, wb) in zip(zip(out, widths), zip(out[1:], widths[1:])):
        assert b - a >= (wa + wb) / 2 + gap - 1e-9
    assert out[0] - widths[0] / 2 >= lo - 1e-9 and out[-1] + widths[-1] / 2 <= hi + 1e-9  # they fit: inside
    if wanted == [5, 100, 200]:
        assert out == [5, 100, 200]  # room enough: where wanted


def test_spread_of_points_is_the_card_label_spread():
    assert cp.spread([10, 10.5, 30], 2.0) == [10, 12, 30]


def _figure(tmp_path, model: str, gpus):
    rows = capacity_rows(["llama-3.2-1b", model], gpus, [512])
    fig = next(f for f in cp.figures(rows, model, None) if f.kind == "curves")
    fig.path = tmp_path / fig.name
    return fig


@pytest.mark.parametrize("model,gpus", [("llama-3.1-8b", SMALL_CARDS), ("llama-3.1-70b", DEFAULT_GPUS)])
def test_exit_labels_in_the_drawn_figure_are_apart(tmp_path, model, gpus):
    plt = cp._plt()
    fig = _figure(tmp_path, model, gpus)
    with plt.rc_context(cp._RC):
        mfig = cp._curves(plt, fig)
    try:
        renderer = mfig.canvas.get_renderer()
        top, *fits = cp.curve_limits(fig.data["points"], fig.data["cards"])
        for ax, fit in zip(mfig.axes, fits):
            labels = {e.label for e in fit.exits}
            texts = [t for t in ax.texts if t.get_text() in labels]
            assert sorted(t.get_text() for t in texts) == sorted(labels)  # one each, drawn
            box = ax.get_window_extent(renderer)
            for row in {round(t.get_window_extent(renderer).y0) for t in texts}:
                extents = sorted((t.get_window_extent(renderer) for t in texts
                                  if round(t.get_window_extent(renderer).y0) == row), key=lambda b: b.x0)
                assert row >= box.y1  # above the panel
                for a, b in zip(extents, extents[1:]):
                    assert b.x0 - a.x1 >= cp.LABEL_GAP * mfig.dpi / 72 - 0.5
    finally:
        plt.close(mfig)


def test_draw_writes_the_curves_png(tmp_path):
    fig = _figure(tmp_path, "llama-3.1-8b", SMALL_CARDS)
    assert "leaving the top is labelled" in fig.caption
    cp.draw(fig)
    assert fig.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.path.stat().st_size > 10_000
