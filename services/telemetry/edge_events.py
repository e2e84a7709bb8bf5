"""Bursts of failed requests from one client, as the gateway sees them, turned into security
events. Envoy answers some failures itself (401 for a bad token, 400 for a malformed request,
413 for an oversized body) and those requests never reach a service; its access log reports
them to telemetry (services/telemetry/access_log.py), which hands each one to the aggregator
here.

Per client network (an IPv4 address and an IPv6 /64 by default: CLIENT_IPV4_PREFIX_LENGTH /
CLIENT_IPV6_PREFIX_LENGTH, read as the quota service reads them) and status code, failures are
counted in a fixed window that starts at the first failure (EDGE_EVENT_WINDOW_SECONDS). The
failure that brings a count to the threshold (EDGE_EVENT_THRESHOLD) yields ONE event for the
burst; the rest of that window yields none.
Once the window has passed, the next failure opens a new window, and a new burst can yield a
new event. Memory is bounded: at most EDGE_EVENT_MAX_TRACKED (network, status) windows are kept;
expired ones are dropped first, then the oldest.

Plain domain code: no gRPC, no I/O, the clock injected.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from services.common.client_networks import DEFAULT_NETWORKS, ClientNetworks

# Event types of the statuses Envoy's filter is expected to send (see the gateway's access
# log); any other status is counted under its own code as an `edge_error_burst`.
EVENT_TYPES: dict[int, str] = {
    400: "edge_bad_request_burst",
    401: "edge_unauthenticated_burst",
    403: "edge_forbidden_burst",
    413: "edge_oversized_request_burst",
    429: "edge_rate_limited_burst",
}
OTHER_EVENT_TYPE = "edge_error_burst"
# Distinct paths kept per window for the event's details, and how much of each.
MAX_SAMPLE_PATHS = 3
MAX_PATH_CHARS = 200


@dataclass(frozen=True)
class EdgeEvent:
    """One burst: `network` sent `count` requests answered `status` within `window_seconds`."""

    event_type: str
    network: str
    status: int
    count: int
    window_seconds: float
    sample_paths: tuple[str, ...]


class _Window:
    __slots__ = ("count", "reported", "samples", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.count = 0
        self.reported = False
        self.samples: list[str] = []


def sample_path(path: str) -> str:
    """The path as an event shows it: without its query string (which may carry anything the
    client sent), truncated, and without NUL characters (which PostgreSQL cannot store)."""
    path = path.split("?", 1)[0].replace("\x00", "")[:MAX_PATH_CHARS]
    # Most failures share a handful of routes: keep one copy of each spelling.
    return sys.intern(path)


class EdgeEventAggregator:
    def __init__(
        self,
        *,
        window_seconds: float = 60.0,
        threshold: int = 20,
        max_tracked: int = 100_000,
        networks: ClientNetworks = DEFAULT_NETWORKS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_seconds <= 0:
            raise ValueError(f"window_seconds must be positive, got {window_seconds}")
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1, got {threshold}")
        if max_tracked < 1:
            raise ValueError(f"max_tracked must be at least 1, got {max_tracked}")
        self.window_seconds = window_seconds
        self.threshold = threshold
        self.max_tracked = max_tracked
        # CLIENT_IPV4_PREFIX_LENGTH / CLIENT_IPV6_PREFIX_LENGTH, as the quota service counts.
        self.networks = networks
        self.clock = clock
        # Ordered by window start, oldest first: a window that restarts moves to the end.
        self._windows: OrderedDict[tuple[str, int], _Window] = OrderedDict()
        self.evicted = 0  # live windows dropped to stay within max_tracked

    def __len__(self) -> int:
        return len(self._windows)

    def observe(self, ip: str, status: int, path: str) -> EdgeEvent | None:
        """Count one failed request; the event when it completes a burst, else None.
        Requests without a usable client address or status are ignored."""
        network = self.networks.network_of(ip)
        if not network or status <= 0:
            return None
        now = self.clock()
        self._expire(now)
        key = (network, status)
        window = self._windows.get(key)
        if window is None or now - window.started >= self.window_seconds:
            window = _Window(now)
            self._windows[key] = window
            self._windows.move_to_end(key)
            while len(self._windows) > self.max_tracked:
                self._windows.popitem(last=False)
                self.evicted += 1
        window.count += 1
        if window.reported:
            return None
        if path and len(window.samples) < MAX_SAMPLE_PATHS:
            sample = sample_path(path)
            if sample not in window.samples:
                window.samples.append(sample)
        if window.count < self.threshold:
            return None
        window.reported = True
        samples = tuple(window.samples)
        window.samples = []  # no longer needed: this window reports nothing more
        return EdgeEvent(
            event_type=EVENT_TYPES.get(status, OTHER_EVENT_TYPE),
            network=network,
            status=status,
            count=window.count,
            window_seconds=self.window_seconds,
            sample_paths=samples,
        )

    def _expire(self, now: float) -> None:
        windows = self._windows
        while windows:
            key, oldest = next(iter(windows.items()))
            if now - oldest.started < self.window_seconds:
                return
            del windows[key]
