"""Simulator settings for in-process test servers, shared by every test that starts one."""

from __future__ import annotations

from typing import Any

from simulator import SimSettings


def sim_settings(**overrides: Any) -> SimSettings:
    # Explicit values win over SIM_* variables, so the developer's environment can't leak in.
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "api_key": None,
        "latency_ms": 0,
        "stream_chunk_delay_ms": 1,
        "seed": 1234,
        "fault_status": 0,
        "fault_rate": 1.0,
        "fault_latency_ms": 0,
        "fault_retry_after": 0,
        "fault_hang": False,
    }
    return SimSettings(**(base | overrides))
