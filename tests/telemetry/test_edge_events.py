"""The edge-event aggregator: bursts of failures per client network and status, one event per
burst, bounded memory. Plain domain code with an injected clock."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common.client_networks import ClientNetworks
from services.telemetry.edge_events import (
    MAX_PATH_CHARS,
    MAX_SAMPLE_PATHS,
    EdgeEvent,
    EdgeEventAggregator,
)
from services.telemetry.settings import TelemetrySettings

WINDOW = 60.0
THRESHOLD = 5


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def aggregator(clock: FakeClock, **overrides: float) -> EdgeEventAggregator:
    values: dict[str, float] = {"window_seconds": WINDOW, "threshold": THRESHOLD, **overrides}
    return EdgeEventAggregator(
        window_seconds=values["window_seconds"],
        threshold=int(values["threshold"]),
        max_tracked=int(values.get("max_tracked", 100)),
        clock=clock,
    )


def feed(
    agg: EdgeEventAggregator, n: int, ip: str = "203.0.113.7", status: int = 401, path: str = "/a"
) -> list[EdgeEvent]:
    events = [agg.observe(ip, status, path) for _ in range(n)]
    return [e for e in events if e is not None]


def test_below_the_threshold_there_is_no_event(clock: FakeClock) -> None:
    agg = aggregator(clock)
    assert feed(agg, THRESHOLD - 1) == []


def test_reaching_the_threshold_yields_exactly_one_event(clock: FakeClock) -> None:
    agg = aggregator(clock)
    assert feed(agg, THRESHOLD - 1, path="/api/profile?token=secret") == []
    clock.now += WINDOW - 1  # still inside the window
    event = agg.observe("203.0.113.7", 401, "/api/quota")
    assert event == EdgeEvent(
        event_type="edge_unauthenticated_burst",
        network="203.0.113.7",
        status=401,
        count=THRESHOLD,
        window_seconds=WINDOW,
        # Distinct, in order of arrival, without the query string.
        sample_paths=("/api/profile", "/api/quota"),
    )


def test_more_failures_in_the_same_window_yield_no_more_events(clock: FakeClock) -> None:
    agg = aggregator(clock)
    assert len(feed(agg, THRESHOLD)) == 1
    assert feed(agg, 10 * THRESHOLD) == []
    clock.now += WINDOW / 2
    assert feed(agg, 10 * THRESHOLD) == []


def test_a_new_window_can_yield_a_new_burst(clock: FakeClock) -> None:
    agg = aggregator(clock)
    assert len(feed(agg, THRESHOLD)) == 1
    clock.now += WINDOW
    # The window has passed: counting starts again, and only a new full burst reports.
    assert feed(agg, THRESHOLD - 1) == []
    assert len(feed(agg, 1)) == 1


def test_failures_spread_over_windows_never_make_a_burst(clock: FakeClock) -> None:
    agg = aggregator(clock)
    for _ in range(5):
        assert feed(agg, THRESHOLD - 1) == []
        clock.now += WINDOW


def test_client_networks_and_statuses_are_counted_apart(clock: FakeClock) -> None:
    agg = aggregator(clock)
    for ip, status in [
        ("203.0.113.7", 401),
        ("203.0.113.8", 401),
        ("203.0.113.7", 400),
        ("203.0.113.7", 413),
    ]:
        assert feed(agg, THRESHOLD - 1, ip=ip, status=status) == []
    assert len(agg) == 4
    [event] = feed(agg, 1, ip="203.0.113.7", status=400)
    assert (event.event_type, event.network, event.status) == (
        "edge_bad_request_burst",
        "203.0.113.7",
        400,
    )
    [event] = feed(agg, 1, ip="203.0.113.7", status=413)
    assert event.event_type == "edge_oversized_request_burst"
    [event] = feed(agg, 1, ip="203.0.113.8", status=401)
    assert event.event_type == "edge_unauthenticated_burst"
    [event] = feed(agg, 1, ip="203.0.113.7", status=401)
    assert event.network == "203.0.113.7"


def test_other_statuses_are_counted_under_their_own_code(clock: FakeClock) -> None:
    agg = aggregator(clock)
    assert feed(agg, THRESHOLD - 1, status=404) == []
    assert feed(agg, THRESHOLD - 1, status=405) == []
    [event] = feed(agg, 1, status=404)
    assert (event.event_type, event.status) == ("edge_error_burst", 404)
    [event] = feed(agg, THRESHOLD, status=403)
    assert event.event_type == "edge_forbidden_burst"
    [event] = feed(agg, THRESHOLD, status=429)
    assert event.event_type == "edge_rate_limited_burst"


def test_ipv6_clients_are_counted_per_64(clock: FakeClock) -> None:
    agg = aggregator(clock)
    events = [agg.observe(f"2001:db8:1:2::{i:x}", 401, "/a") for i in range(1, THRESHOLD + 1)]
    assert [e.network for e in events if e is not None] == ["2001:db8:1:2::/64"]
    assert feed(agg, THRESHOLD - 1, ip="2001:db8:1:3::1") == []


def test_the_configured_prefix_lengths_are_the_networks_counted(clock: FakeClock) -> None:
    """CLIENT_IPV4_PREFIX_LENGTH / CLIENT_IPV6_PREFIX_LENGTH, as the quota service counts."""
    agg = EdgeEventAggregator(
        window_seconds=WINDOW,
        threshold=THRESHOLD,
        networks=ClientNetworks(ipv4_prefix=24, ipv6_prefix=48),
        clock=clock,
    )
    ipv4 = [agg.observe(f"198.51.100.{i}", 401, "/a") for i in range(1, THRESHOLD + 1)]
    assert [e.network for e in ipv4 if e is not None] == ["198.51.100.0/24"]
    ipv6 = [agg.observe(f"2001:db8:1:{i:x}::1", 401, "/a") for i in range(1, THRESHOLD + 1)]
    assert [e.network for e in ipv6 if e is not None] == ["2001:db8:1::/48"]
    mapped = [agg.observe(f"::ffff:203.0.113.{i}", 400, "/a") for i in range(THRESHOLD)]
    assert [e.network for e in mapped if e is not None] == ["203.0.113.0/24"]

    whole = EdgeEventAggregator(threshold=2, networks=ClientNetworks(ipv6_prefix=128), clock=clock)
    assert whole.observe("2001:db8:1:2::1", 401, "/a") is None
    assert whole.observe("2001:db8:1:2::2", 401, "/a") is None  # another address, another client
    event = whole.observe("2001:db8:1:2::1", 401, "/a")
    assert event is not None and event.network == "2001:db8:1:2::1"


def test_telemetry_reads_the_client_network_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert TelemetrySettings().client_networks == ClientNetworks(32, 64)
    monkeypatch.setenv("CLIENT_IPV4_PREFIX_LENGTH", "24")
    monkeypatch.setenv("CLIENT_IPV6_PREFIX_LENGTH", "56")
    assert TelemetrySettings().client_networks == ClientNetworks(24, 56)
    monkeypatch.setenv("CLIENT_IPV6_PREFIX_LENGTH", "129")
    with pytest.raises(ValidationError, match="CLIENT_IPV6_PREFIX_LENGTH"):
        TelemetrySettings()


def test_client_network_spellings() -> None:
    client_network = ClientNetworks().network_of  # the default prefixes, /32 and /64
    assert client_network("203.0.113.7") == "203.0.113.7"
    assert client_network(" 203.0.113.7 ") == "203.0.113.7"
    assert client_network("::ffff:203.0.113.7") == "203.0.113.7"
    assert client_network("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert client_network("") == ""
    assert client_network("/var/run/envoy.sock") == ""


def test_requests_without_a_client_or_a_status_are_ignored(clock: FakeClock) -> None:
    agg = aggregator(clock, threshold=1)
    assert agg.observe("", 401, "/a") is None
    assert agg.observe("not-an-ip", 401, "/a") is None
    assert agg.observe("203.0.113.7", 0, "/a") is None
    assert len(agg) == 0


def test_sample_paths_are_few_short_and_storable(clock: FakeClock) -> None:
    agg = aggregator(clock, threshold=10)
    paths = ["/x" * 500, "/a\x00b", "/a\x00b", "/c", "/d", "/e"]
    for path in paths:
        assert agg.observe("203.0.113.7", 400, path) is None
    events = feed(agg, 4, status=400, path="")
    assert len(events) == 1
    samples = events[0].sample_paths
    assert len(samples) == MAX_SAMPLE_PATHS
    assert samples == (("/x" * 500)[:MAX_PATH_CHARS], "/ab", "/c")


def test_expired_windows_are_dropped(clock: FakeClock) -> None:
    agg = aggregator(clock)
    for i in range(50):
        agg.observe(f"198.51.100.{i}", 401, "/a")
    assert len(agg) == 50
    clock.now += WINDOW
    agg.observe("203.0.113.7", 401, "/a")
    assert len(agg) == 1
    assert agg.evicted == 0


def test_the_number_of_tracked_windows_is_bounded(clock: FakeClock) -> None:
    agg = aggregator(clock, max_tracked=10)
    for i in range(1000):
        clock.now += 0.001
        agg.observe(f"10.0.{i // 250}.{i % 250}", 401, f"/{i}")
        assert len(agg) <= 10
    assert agg.evicted == 990
    # The newest survive: the most recent client still reaches its burst.
    assert len(feed(agg, THRESHOLD - 1, ip="10.0.3.249")) == 1
    # An evicted client starts again from zero.
    assert feed(agg, THRESHOLD - 1, ip="10.0.0.0") == []


def test_a_restarted_window_is_the_newest(clock: FakeClock) -> None:
    agg = aggregator(clock, max_tracked=2)
    agg.observe("192.0.2.1", 401, "/a")
    clock.now += WINDOW / 2
    agg.observe("192.0.2.2", 401, "/a")
    clock.now += WINDOW / 2  # 192.0.2.1's window has passed; it restarts, now newest
    agg.observe("192.0.2.1", 401, "/a")
    agg.observe("192.0.2.3", 401, "/a")  # evicts the oldest: 192.0.2.2
    assert agg.evicted == 1
    assert len(feed(agg, THRESHOLD - 1, ip="192.0.2.1")) == 1


@pytest.mark.parametrize(
    "bad", [{"window_seconds": 0}, {"threshold": 0}, {"max_tracked": 0}], ids=str
)
def test_nonsense_limits_are_refused(bad: dict[str, float]) -> None:
    values: dict[str, float] = {"window_seconds": 60, "threshold": 1, "max_tracked": 1, **bad}
    with pytest.raises(ValueError):
        EdgeEventAggregator(
            window_seconds=values["window_seconds"],
            threshold=int(values["threshold"]),
            max_tracked=int(values["max_tracked"]),
        )
