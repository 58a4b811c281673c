"""Edge cases of the window kernels: Tiles, WindowAgg, RecentEvents."""

from __future__ import annotations

import gc
import math
import statistics
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamscore.kernels import tiles as tiles_module
from streamscore.kernels.recent import RecentEvents
from streamscore.kernels.tiles import Tiles, WindowAgg, _window_agg_py, window

R = 10_000  # 10 s resolution
W = 5 * 60_000  # 5 min window: 30 buckets


def tiles_with(times: list[int], r: int = R, amount: int = 1) -> Tiles:
    tiles = Tiles(r)
    for time_ms in times:
        tiles.add(time_ms, amount, False)
    return tiles


# --- bucket edges ---------------------------------------------------------------------


def test_event_exactly_on_bucket_boundary_belongs_to_that_bucket():
    tiles = tiles_with([5 * R])
    assert set(tiles.buckets) == {5}
    assert window(tiles, 5 * R, W).events == 1  # t on the same boundary
    assert window(tiles, 5 * R - 1, W).events == 0  # t one ms before: previous bucket is b(t)
    assert window(tiles, 6 * R - 1, W).events == 1  # t at the end of the same bucket


def test_events_later_in_the_current_bucket_count():
    # DESIGN filters on buckets only: b(e) <= b(t), so an event after t but in b(t) counts.
    tiles = tiles_with([5 * R + R - 1])
    assert window(tiles, 5 * R, W).events == 1


def test_t_on_bucket_boundary_window_covers_w_minus_r_of_history():
    t = 100 * R
    # Oldest bucket in the window is b(t) - W/r + 1, which starts at t - W + r.
    tiles = tiles_with([t - W + R, t - W + R - 1, t - W, t])
    agg = window(tiles, t, W)
    assert agg.events == 2  # t - W + R and t itself


def test_t_at_end_of_bucket_window_covers_almost_w_of_history():
    t = 100 * R + R - 1
    # Oldest included time is still (b(t) - W/r + 1) * r = t - W + 1: W - 1 ms back.
    tiles = tiles_with([t - W + 1, t - W, t])
    assert window(tiles, t, W).events == 2
    # One ms later the window slides by a whole bucket.
    assert window(tiles, t + 1, W).events == 1


def test_window_equal_to_resolution_is_the_current_bucket_only():
    tiles = tiles_with([0, R - 1, R, 2 * R - 1, 2 * R])
    assert window(tiles, R, R).events == 2
    assert window(tiles, 2 * R - 1, R).events == 2
    assert window(tiles, 0, R).events == 2


@pytest.mark.parametrize("shift", [0, -7 * R, -(10**12)])
def test_zero_and_negative_times_use_floor_buckets(shift):
    # -1 ms is in bucket -1, not bucket 0 (floor, not truncation).
    tiles = tiles_with([shift - 1, shift, shift + R - 1])
    assert window(tiles, shift, R).events == 2
    assert window(tiles, shift - 1, R).events == 1
    assert window(tiles, shift - R, R).events == 1  # same bucket as shift - 1
    assert window(tiles, shift - R - 1, R).events == 0
    assert window(tiles, shift, 2 * R).events == 3


def test_negative_resolution_window_edges():
    tiles = tiles_with([-R, -R - 1])  # buckets -1 and -2
    assert set(tiles.buckets) == {-1, -2}
    assert window(tiles, -1, R).events == 1
    assert window(tiles, -1, 2 * R).events == 2


# --- aggregates -----------------------------------------------------------------------


def test_empty_windows_give_zeros():
    empty = WindowAgg()
    assert (empty.events, empty.declined, empty.amount_sum, empty.amount_max) == (0, 0, 0, 0)
    assert empty.amount_mean == 0.0
    assert empty.amount_std == 0.0
    assert empty.decline_rate == 0.0

    tiles = Tiles(R, n_distinct=2)
    agg = window(tiles, 123_456, W)
    assert agg == WindowAgg(0, 0, 0, 0, 0, (0, 0))
    assert (agg.amount_mean, agg.amount_std, agg.decline_rate) == (0.0, 0.0, 0.0)

    tiles.add(0, 500, True, ("m", "c"))
    later = window(tiles, W, W)  # the event's bucket just fell out of the window
    assert later == WindowAgg(0, 0, 0, 0, 0, (0, 0))
    assert (later.amount_mean, later.amount_std, later.decline_rate) == (0.0, 0.0, 0.0)


def test_aggregates_over_several_buckets():
    tiles = Tiles(R, n_distinct=2)
    tiles.add(0, 100, False, ("m1", "c1"))
    tiles.add(1, 300, True, ("m1", "c2"))
    tiles.add(R, 0, True, ("m1", "c1"))  # next bucket, same values again
    tiles.add(2 * R, 50, False, ("m2", "c1"))
    agg = window(tiles, 2 * R, 3 * R)
    assert agg.events == 4
    assert agg.declined == 2
    assert agg.amount_sum == 450
    assert agg.amount_sumsq == 100**2 + 300**2 + 50**2
    assert agg.amount_max == 300
    assert agg.distinct == (2, 2)  # unions across buckets, not sums of per-bucket counts
    assert agg.amount_mean == 450 / 4
    assert agg.decline_rate == 0.5
    assert agg.amount_std == statistics.pstdev([100, 300, 0, 50])


def test_max_of_zero_amounts_is_zero():
    tiles = tiles_with([0, 1], amount=0)
    agg = window(tiles, 0, R)
    assert agg.events == 2
    assert agg.amount_max == 0


def test_std_is_exact_for_large_amounts():
    base = 10**12
    amounts = [base, base + 1, base + 2]
    tiles = Tiles(R)
    for i, amount in enumerate(amounts):
        tiles.add(i, amount, False)
    agg = window(tiles, 0, R)
    # n^2 var = 6 exactly; float moments would have cancelled catastrophically.
    assert agg.amount_std == statistics.pstdev(amounts)
    assert agg.amount_mean == base + 1


AMOUNTS = st.one_of(
    st.integers(0, 100),
    st.integers(0, 10**7),
    st.integers(0, 2**63 - 1),
    st.sampled_from([0, 1, 29, 2**53 - 1, 2**53, 2**53 + 1, 2**62, 2**63 - 1]),
)


@settings(max_examples=500, deadline=None)
@given(amounts=st.lists(AMOUNTS, min_size=1, max_size=40))
@example(amounts=[0, 0, 29])  # math.sqrt(var) is one ulp below: 13.670731102939918
@example(amounts=[10**12, 10**12 + 1, 10**12 + 2])
def test_std_is_correctly_rounded(amounts):
    """The float nearest the exact population std (``statistics.pstdev``), in both
    twins: the compiled one's long double path, its exact fallback, and Python's."""
    want = statistics.pstdev(amounts)
    for make in (Tiles, tiles_module.PyTiles):
        tiles = make(R)
        for i, amount in enumerate(amounts):
            tiles.add(i, amount, False)
        assert window(tiles, 0, R).amount_std == want, make


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 2**200), m=st.integers(1, 2**130))
def test_sqrt_of_ratio_is_correctly_rounded(n, m):
    """Against exact rationals: the result's neighbours are no nearer sqrt(n / m)."""
    got = tiles_module.sqrt_of_ratio(n, m)
    assert got >= 0.0
    ratio = Fraction(n, m)

    def closer(other: float) -> bool:
        # |other - s| < |got - s| with s = sqrt(ratio), both sides >= 0, squared out:
        # (other - got) * (other + got - 2 s) < 0.
        if other < 0:
            return False
        a, b = Fraction(other), Fraction(got)
        mid = (a + b) / 2
        return (mid * mid < ratio) == (a > b) and mid * mid != ratio

    assert not closer(math.nextafter(got, math.inf))
    assert not closer(math.nextafter(got, -math.inf))


@pytest.mark.parametrize("amount", [10**12, 2**63 - 1])
def test_std_of_identical_large_amounts_is_exactly_zero(amount):
    tiles = tiles_with([0, 1, 2, 3, 4], amount=amount)
    agg = window(tiles, 0, R)
    assert agg.amount_std == 0.0
    assert agg.amount_sum == 5 * amount  # exact Python int
    assert agg.amount_mean == float(amount)


def test_single_event_std_is_zero():
    tiles = tiles_with([0], amount=987_654_321)
    assert window(tiles, 0, R).amount_std == 0.0


def test_std_large_spread():
    amounts = [0, 10**9, 10**12, 7, 2**62]
    tiles = Tiles(R)
    for amount in amounts:
        tiles.add(0, amount, False)
    agg = window(tiles, 0, R)
    assert agg.amount_std == statistics.pstdev(amounts)
    assert agg.amount_mean == sum(amounts) / len(amounts)


# --- add / expire / validation --------------------------------------------------------


def test_add_reports_new_buckets():
    tiles = Tiles(R)
    assert tiles.add(0, 1, False) is True
    assert tiles.add(R - 1, 1, False) is False
    assert tiles.add(R, 1, False) is True
    assert tiles.add(-1, 1, False) is True
    assert len(tiles) == 3


def test_add_checks_distinct_arity():
    tiles = Tiles(R, n_distinct=1)
    with pytest.raises(ValueError):
        tiles.add(0, 1, False, ())


def test_expire_drops_only_buckets_wholly_before():
    tiles = tiles_with([-R, 0, R, 2 * R, 3 * R])
    # keep_from inside bucket 2: bucket 2 is kept whole, buckets < 2 go.
    assert tiles.expire(2 * R + 5) == 3
    assert set(tiles.buckets) == {2, 3}
    assert tiles.expire(2 * R) == 0  # exactly on the boundary: bucket 2 kept
    assert tiles.expire(2 * R + 1) == 0
    assert tiles.expire(4 * R) == 2
    assert len(tiles) == 0
    assert window(tiles, 4 * R, W) == WindowAgg()


def test_expire_with_negative_keep_from():
    tiles = tiles_with([-3 * R, -R - 1, -R, 0])  # buckets -3, -2, -1, 0
    assert tiles.expire(-R - 1) == 1  # keep from bucket -2
    assert set(tiles.buckets) == {-2, -1, 0}


def test_expire_does_not_change_windows_that_start_after_keep_from():
    times = list(range(0, 100 * R, 777))
    full = tiles_with(times)
    expired = tiles_with(times)
    t = 80 * R + 123
    keep_from = t - W  # window's oldest bucket starts after this
    expired.expire(keep_from)
    assert window(expired, t, W) == window(full, t, W)


def test_expire_after_adding_an_older_bucket():
    tiles = tiles_with([5 * R, 6 * R])
    assert tiles.expire(5 * R) == 0
    tiles.add(3 * R, 1, False)  # out of order: now the oldest bucket
    assert tiles.expire(4 * R) == 1
    assert set(tiles.buckets) == {5, 6}
    assert tiles.expire(6 * R) == 1
    assert set(tiles.buckets) == {6}
    assert tiles.expire(10 * R) == 1
    assert tiles.expire(10 * R) == 0
    tiles.add(2 * R, 1, False)  # empty tiles, then an old bucket again
    assert tiles.expire(3 * R) == 1
    assert len(tiles) == 0


@settings(max_examples=200, deadline=None)
@given(
    times=st.lists(st.integers(-50 * R, 50 * R), max_size=60),
    t=st.integers(-60 * R, 60 * R),
    n_buckets=st.integers(1, 40),
    keep_from=st.one_of(st.none(), st.integers(-60 * R, 60 * R)),
)
def test_window_matches_brute_force(times, t, n_buckets, keep_from):
    """Both lookup strategies (scan stored buckets, or walk the window's bucket range)."""
    tiles = Tiles(R, n_distinct=1)
    for i, time_ms in enumerate(times):
        tiles.add(time_ms, i * 10**11, i % 3 == 0, (f"v{i % 4}",))
    kept = list(enumerate(times))
    if keep_from is not None:
        tiles.expire(keep_from)
        kept = [(i, x) for i, x in kept if x // R >= keep_from // R]
    in_window = [(i, x) for i, x in kept if t // R - n_buckets < x // R <= t // R]
    agg = window(tiles, t, n_buckets * R)
    assert agg.events == len(in_window)
    assert agg.declined == sum(1 for i, _ in in_window if i % 3 == 0)
    assert agg.amount_sum == sum(i * 10**11 for i, _ in in_window)
    assert agg.amount_max == max((i * 10**11 for i, _ in in_window), default=0)
    assert agg.distinct == (len({i % 4 for i, _ in in_window}),)
    amounts = [i * 10**11 for i, _ in in_window]
    assert agg.amount_std == (statistics.pstdev(amounts) if amounts else 0.0)


@pytest.mark.parametrize("resolution", [0, -R])
def test_resolution_must_be_positive(resolution):
    with pytest.raises(ValueError):
        Tiles(resolution)


@pytest.mark.parametrize("window_ms", [0, -R, R + 1, R // 2])
def test_window_must_be_positive_multiple_of_resolution(window_ms):
    with pytest.raises(ValueError):
        window(Tiles(R), 0, window_ms)


# --- RecentEvents ---------------------------------------------------------------------


def test_recent_empty():
    recent = RecentEvents(horizon_ms=1000)
    assert recent.newest_ms is None
    assert not recent.is_too_old(-(10**15))
    assert recent.newest_at_or_before(10**15) is None
    assert "x" not in recent
    assert len(recent) == 0


def test_recent_lone_event_then_many_then_lone_again():
    """One event in the horizon is kept as a tuple, more as a dict, and one again as a
    tuple once pruning leaves one: the answers are the same either way."""
    recent = RecentEvents(horizon_ms=1000)
    recent.add(5000, "a")
    assert isinstance(recent._times, tuple)
    assert "a" in recent and "b" not in recent and len(recent) == 1
    assert recent.newest_at_or_before(4999) is None
    recent.add(4500, "b")  # older, within the horizon
    assert isinstance(recent._times, dict)
    assert "a" in recent and "b" in recent and len(recent) == 2
    assert recent.newest_at_or_before(4999) == 4500
    recent.add(7000, "c")  # prunes "a" (5000) and then "b" (4500): one left
    assert isinstance(recent._times, tuple)
    assert "c" in recent and "a" not in recent and "b" not in recent and len(recent) == 1
    assert recent.newest_at_or_before(6999) == 5000  # the newest pruned one
    # Before every kept event and the newest pruned one: not answered (the store
    # refuses queries that far behind the newest event, see earliest_exact_ms).
    assert recent.newest_at_or_before(4999) is None
    recent.add(9000, "d")  # the lone "c" falls out of the horizon: replaced, no dict
    assert recent._times == ("d", 9000)
    assert "c" not in recent and len(recent) == 1
    assert recent.newest_at_or_before(8999) == 7000
    assert recent.older_newest_ms == 7000


def test_recent_too_old_boundary_is_exclusive():
    recent = RecentEvents(horizon_ms=1000)
    recent.add(5000, "a")
    assert not recent.is_too_old(4000)  # exactly newest - horizon: still allowed
    assert recent.is_too_old(3999)
    assert not recent.is_too_old(10**9)


def test_recent_keeps_keys_within_horizon_and_prunes_older():
    recent = RecentEvents(horizon_ms=1000)
    recent.add(0, "a")
    recent.add(500, "b")
    recent.add(1000, "c")  # horizon start 0: "a" at exactly 0 is kept
    assert "a" in recent
    recent.add(1001, "d")  # horizon start 1: "a" pruned
    assert "a" not in recent
    assert {"b", "c", "d"} <= {k for k in ("a", "b", "c", "d") if k in recent}
    assert len(recent) == 3
    # An out-of-order event within the horizon does not move newest.
    recent.add(700, "e")
    assert recent.newest_ms == 1001
    assert "e" in recent


def test_recent_newest_at_or_before():
    recent = RecentEvents(horizon_ms=1000)
    for time_ms, key in [(-50, "a"), (200, "b"), (5000, "c"), (4500, "d"), (4000, "e")]:
        recent.add(time_ms, key)
    assert recent.newest_at_or_before(10_000) == 5000
    assert recent.newest_at_or_before(5000) == 5000
    assert recent.newest_at_or_before(4999) == 4500
    assert recent.newest_at_or_before(4499) == 4000
    # Within the queryable range (t >= newest - horizon) answers come from kept events or
    # from the newest pruned one.
    assert recent.newest_at_or_before(3999) == 200
    # (Earlier t, before newest - horizon, is outside what the store promises to answer.)


def test_recent_newest_at_or_before_without_pruning():
    recent = RecentEvents(horizon_ms=10_000)
    for time_ms, key in [(-50, "a"), (200, "b"), (100, "c")]:
        recent.add(time_ms, key)
    assert recent.newest_at_or_before(199) == 100
    assert recent.newest_at_or_before(99) == -50
    assert recent.newest_at_or_before(-50) == -50
    assert recent.newest_at_or_before(-51) is None


def test_recent_negative_times():
    recent = RecentEvents(horizon_ms=10)
    recent.add(-100, "a")
    recent.add(-95, "b")
    assert recent.is_too_old(-106)
    assert not recent.is_too_old(-105)
    assert recent.newest_at_or_before(-96) == -100
    assert recent.newest_at_or_before(-101) is None


def test_recent_newest_at_or_before_with_a_key_left_behind_by_lazy_pruning():
    recent = RecentEvents(horizon_ms=100)
    recent.add(50, "a")
    recent.add(120, "b")
    recent.add(40, "c")  # out of order, inserted behind b
    recent.add(155, "d")  # prunes a (front, out of horizon); c waits behind b
    assert "a" not in recent
    assert recent.newest_at_or_before(45) == 40
    assert recent.newest_at_or_before(52) == 50  # the pruned a, not the older c
    assert recent.newest_at_or_before(130) == 120


def _uncached(tiles: Tiles, t: int, window_ms: int) -> WindowAgg:
    last = t // tiles.resolution_ms
    first = last - window_ms // tiles.resolution_ms + 1
    return _window_agg_py(WindowAgg, tiles.buckets, first, last, tiles.n_distinct)


ADD = st.tuples(
    st.just("add"),
    st.integers(0, 40 * R),
    st.integers(0, 1000),
    st.booleans(),
    st.sampled_from("abcdefgh"),
)
OPS = st.lists(
    st.one_of(
        ADD,
        # Few distinct query times and window lengths, so cached parts get reused
        # (and must be invalidated) often; plus any time at all.
        st.tuples(
            st.just("window"),
            st.one_of(
                st.sampled_from([20 * R, 20 * R + 5, 33 * R, 40 * R + 1]), st.integers(0, 45 * R)
            ),
            st.sampled_from([4, 9, 12, 30]),
        ),
        st.tuples(st.just("expire"), st.integers(0, 15 * R)),
        st.just(("again",)),  # the previous query once more: a cached part reused
    ),
    min_size=5,
    max_size=120,
)


BUSY = [("add", b * R, 10, False, "a") for b in range(41)]


@settings(max_examples=300)
@given(st.lists(ADD, min_size=10, max_size=60), OPS)
# A late event into a cached closed part, and an expiry inside one: both must be seen.
@example(BUSY, [("window", 20 * R + 5, 12), ("add", 15 * R, 5, False, "z"), ("again",)])
@example(BUSY, [("window", 20 * R + 5, 12), ("expire", 12 * R), ("again",)])
@pytest.mark.parametrize("tiles_type", [Tiles, tiles_module.PyTiles], ids=["compiled", "python"])
def test_cached_windows_equal_a_fresh_scan_under_any_interleaving(
    tiles_type: type[Tiles], history: list[tuple], ops: list[tuple]
) -> None:
    """The closed-part cache (long windows of busy entities) gives exactly what a
    scan of the buckets gives, whatever order adds (late ones included), queries at
    moving times and expiries come in."""
    tiles = tiles_type(R, n_distinct=1)
    last_query = ("window", 20 * R, 12)
    for op in history + ops:
        if op[0] == "again":
            op = last_query
        if op[0] == "add":
            _, time_ms, amount, declined, value = op
            tiles.add(time_ms, amount, declined, (value,))
        elif op[0] == "window":
            _, t, n_buckets = last_query = op
            assert window(tiles, t, n_buckets * R) == _uncached(tiles, t, n_buckets * R), op
        else:
            tiles.expire(op[1])


def test_the_compiled_tiles_are_built_and_used():
    """`pip install` builds them (a missing compiler falls back to the Python quietly,
    which would leave the tests below comparing the Python with itself)."""
    from streamscore.kernels import _windows

    assert Tiles is _windows.Tiles
    # The C type itself: never tracked by the cyclic GC, however many entities.
    assert not gc.is_tracked(Tiles(R, n_distinct=1))
    assert tiles_module.windowed_values is _windows.windowed_values
    assert _windows.CACHE_MIN_BUCKETS == tiles_module.CACHE_MIN_BUCKETS


# Amounts as events carry them, [0, 2**63): the extremes overflow 64-bit sums.
AMOUNT = st.one_of(st.integers(0, 1000), st.integers(0, 2**63 - 1), st.just(2**63 - 1))
TILES_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.integers(-50, 50),
            AMOUNT,
            st.booleans(),
            st.sampled_from("abcdef"),
            st.sampled_from("uvwxyz"),
        ),
        # Few window lengths and times, so cached closed parts are reused (and must be
        # invalidated) often.
        st.tuples(st.just("window"), st.integers(-60, 60), st.sampled_from([1, 3, 9, 12, 40])),
        st.tuples(st.just("expire"), st.integers(-55, 55)),
    ),
    max_size=150,
)


@settings(max_examples=300)
@given(TILES_OPS, st.integers(0, 2))
@example(
    [
        ("add", 3, 2**63 - 1, False, "a", "u"),
        ("add", 3, 2**63 - 1, True, "b", "u"),
        ("window", 3, 1),
    ],
    2,
)
def test_compiled_tiles_equal_the_python_twin(ops: list[tuple], n_distinct: int) -> None:
    """Any interleaving of adds (late ones included), window reads and expiries: the
    same answers, bucket for bucket and window for window, as ``PyTiles``."""
    compiled, python = Tiles(1, n_distinct), tiles_module.PyTiles(1, n_distinct)
    for op in ops:
        if op[0] == "add":
            _, time_ms, amount, declined, value, other = op
            values = (value, other)[:n_distinct]
            assert compiled.add(time_ms, amount, declined, values) == python.add(
                time_ms, amount, declined, values
            ), op
        elif op[0] == "window":
            _, t, n_buckets = op
            got, want = window(compiled, t, n_buckets), window(python, t, n_buckets)
            assert type(got) is WindowAgg and got == want, op
        else:
            assert compiled.expire(op[1]) == python.expire(op[1]), op
        assert len(compiled) == len(python)
    assert compiled.buckets == python.buckets


def test_compiled_tiles_keep_a_lone_value_until_a_second_one_comes():
    """A bucket's only distinct value is kept as it is (no set of one); values are
    compared by equality, not identity, as a set compares them."""
    tiles = Tiles(R, n_distinct=1)
    first, same = "".join(["m", "1"]), "".join(["m", "1"])
    assert first is not same
    tiles.add(0, 1, False, (first,))
    tiles.add(1, 1, False, (same,))
    assert window(tiles, 0, R).distinct == (1,)
    assert tiles.buckets[0][5] == {"m1"}
    tiles.add(2, 1, False, ("m2",))
    assert window(tiles, 0, R).distinct == (2,)
    assert tiles.buckets[0][5] == {"m1", "m2"}
    with pytest.raises(TypeError):
        tiles.add(R, 1, False, (["unhashable"],))
    assert len(tiles) == 1


def test_compiled_tiles_refuse_what_events_never_carry():
    tiles = Tiles(R, n_distinct=1)
    # ValueError for any amount out of range: the replica counts a bad entry and goes on.
    for amount in (-1, 2**63, -(2**70)):
        with pytest.raises(ValueError, match=r"amount must be in \[0, 2\*\*63\)"):
            tiles.add(0, amount, False, ("a",))
    with pytest.raises(TypeError):
        tiles.add(0, 1.5, False, ("a",))
    with pytest.raises(TypeError, match="must be a tuple"):
        tiles.add(0, 1, False, ["a"])
    with pytest.raises(ValueError, match="expected 1 distinct values"):
        tiles.add(0, 1, False, ("a", "b"))
    with pytest.raises(ValueError, match="n_distinct"):
        Tiles(R, n_distinct=9)
    assert len(tiles) == 0  # nothing half-added
    assert tiles.resolution_ms == R and tiles.n_distinct == 1


# One entity's tiles at two resolutions, as the feature store keeps them: fine ones
# with two distinct sets, coarse ones with none; and every read code over windows of
# both, long ones (the closed-part cache path) included.
FINE, COARSE = 2, 8
EVENT = st.tuples(
    st.integers(-40 * COARSE, 40 * COARSE),
    AMOUNT,
    st.booleans(),
    st.sampled_from("abcdef"),
    st.sampled_from("uvwxyz"),
)
READS = st.lists(
    st.tuples(st.sampled_from(range(8)), st.sampled_from([0, 1])), min_size=1, max_size=6
)
PLAN = st.lists(
    st.tuples(st.sampled_from([FINE, COARSE]), st.integers(1, 40), READS), min_size=1, max_size=5
)


def _plan(drawn: list) -> tuple:
    plan = []
    for i, (resolution, n_buckets, reads) in enumerate(drawn):
        n_distinct = 2 if resolution == FINE else 0  # the tiles' distinct fields
        named = tuple(
            (f"f{i}_{j}", code, slot if code == tiles_module.READ_DISTINCT else -1)
            for j, (code, slot) in enumerate(reads)
            if code != tiles_module.READ_DISTINCT or n_distinct
        )
        index = 0 if resolution == FINE else 1  # its tiles in the entity's tuple
        plan.append((index, n_buckets * resolution, named))
    return tuple(plan)


@settings(max_examples=300)
@given(
    st.lists(EVENT, max_size=80),
    PLAN,
    st.lists(st.integers(-45 * COARSE, 45 * COARSE), min_size=1, max_size=4),
)
def test_compiled_windowed_values_equal_the_python_reads(
    events: list, drawn_plan: list, times: list[int]
) -> None:
    """Every read, through the scan or through the closed-part cache, is the same float
    as the Python readers give, at any query time (repeated: cached parts reused)."""
    from streamscore.kernels import _windows

    both = []
    for tiles_type in (Tiles, tiles_module.PyTiles):
        fine, coarse = tiles_type(FINE, 2), tiles_type(COARSE, 0)
        for time_ms, amount, declined, merchant, card in events:
            fine.add(time_ms, amount, declined, (merchant, card))
            coarse.add(time_ms, amount, declined)
        both.append((fine, coarse))
    plan = _plan(drawn_plan)
    for t in [*times, *times]:
        compiled: dict[str, float] = {}
        python: dict[str, float] = {}
        _windows.windowed_values(compiled, both[0], t, plan)
        tiles_module._windowed_values_py(python, both[1], t, plan)
        assert {k: repr(v) for k, v in compiled.items()} == {
            k: repr(v) for k, v in python.items()
        }, t


def test_windowed_values_is_what_the_store_uses_and_it_refuses_bad_plans():
    from streamscore.kernels import _windows

    assert tiles_module.windowed_values is _windows.windowed_values
    tiles = (Tiles(FINE, 1),)
    tiles[0].add(3, 10, False, ("a",))
    read = _windows.windowed_values
    with pytest.raises(ValueError, match="unknown read code 9"):
        read({}, tiles, 4, ((0, 4, (("x", 9, -1),)),))
    with pytest.raises(ValueError, match="distinct slot 1 out of range"):
        read({}, tiles, 4, ((0, 4, (("x", tiles_module.READ_DISTINCT, 1),)),))
    with pytest.raises(ValueError, match="not a positive multiple"):
        read({}, tiles, 4, ((0, 5, ()),))
    for index in (1, -1):
        with pytest.raises(IndexError, match=f"no tiles at index {index}"):
            read({}, tiles, 4, ((index, 6, ()),))
    with pytest.raises(TypeError, match="plan item"):
        read({}, tiles, 4, ((0, 4),))
    with pytest.raises(TypeError, match="tiles and plan tuples"):
        read({}, list(tiles), 4, ((0, 4, ()),))
    with pytest.raises(TypeError, match="compiled Tiles"):
        read({}, (tiles_module.PyTiles(FINE, 1),), 4, ((0, 4, ()),))
    values: dict[str, float] = {}
    read(values, tiles, 4, ((0, 4, (("n", 0, -1), ("d", 7, 0), ("m", 4, -1))),))
    assert values == {"n": 1.0, "d": 1.0, "m": 10.0}
