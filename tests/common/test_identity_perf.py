from __future__ import annotations

import pytest

from services.common.identity import identity_from_metadata
from services.common.perf import PerformanceMonitor


def test_identity_prefers_envoys_headers() -> None:
    ident = identity_from_metadata(
        [("x-genmesh-user-id", "u1"), ("x-genmesh-client-ip", "203.0.113.9")], "ipv4:10.0.0.1:5"
    )
    assert (ident.user_id, ident.client_ip, ident.is_guest) == ("u1", "203.0.113.9", False)


@pytest.mark.parametrize(
    ("peer", "ip"), [("ipv4:10.0.0.1:5555", "10.0.0.1"), ("ipv6:[::1]:5555", "::1"), ("unix:x", "")]
)
def test_identity_falls_back_to_the_peer(peer: str, ip: str) -> None:
    ident = identity_from_metadata([], peer)
    assert ident.is_guest
    assert ident.client_ip == ip


async def test_perf_counts_errors_and_slow_calls() -> None:
    perf = PerformanceMonitor(slow_threshold_ms=50)
    async with perf.track("op"):
        pass
    with pytest.raises(RuntimeError):
        async with perf.track("op"):
            raise RuntimeError("boom")
    perf.record("op", 75.0)
    (totals,) = perf.snapshot()
    assert (totals.count, totals.errors, totals.slow) == (3, 1, 1)
    assert totals.max_ms == 75.0
    assert totals.error_rate == pytest.approx(1 / 3)
