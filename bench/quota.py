"""Quota reservations per second of one quota process, in `make bench`, the two ways generation
makes them (services/generation/quota_client.py), from a fixed number of workers with one in
flight each, as guests (the bench's generate traffic is a guest's: the reservation lives in
Redis) from many client networks:

- a pair, ReserveQuota then SettleReservation(COMMIT): a cache miss's (two RPCs);
- a consume, ReserveQuota with `consume` set: a cache hit's (one RPC);
- and, when the run has the shape's floor (bench/floor_server.py), its quota role's call: one
  RPC and one Redis round trip with no code, the least a consume can cost in this shape.

The kinds alternate round by round after a warm-up of each; the figures are medians.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.gateway import ECHO_RPC
from bench.proc import CpuWindow
from bench.stats import fmt, median_known, per_unit_us, percentile, share_percent
from genmesh.bench.v1 import echo_pb2
from genmesh.quota.v1 import quota_pb2

SERVICE = "/genmesh.quota.v1.QuotaService"
CALL_TIMEOUT_SECONDS = 5.0
# Distinct guest networks cycled through (10.<n>.<m>.1), as many clients would be.
GUESTS = 1024


@dataclass
class QuotaRun:
    kind: str
    reservations: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    refused: int = 0
    errors: int = 0
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.reservations / self.seconds if self.seconds else 0.0


def guest_requests(consume: bool) -> list[bytes]:
    """Serialized ReserveQuotaRequests, made once so the client spends its CPU on calls."""
    return [
        quota_pb2.ReserveQuotaRequest(
            caller=quota_pb2.Caller(client_ip=f"10.{i >> 8 & 255}.{i & 255}.1"), consume=consume
        ).SerializeToString()
        for i in range(GUESTS)
    ]


PAIR = "reserve + settle (miss)"
CONSUME = "consume (hit)"
FLOOR = "floor: 1 RPC + 1 Redis trip"
KINDS = (PAIR, CONSUME, FLOOR)


async def _drive(
    channel: grpc.aio.Channel,
    kind: str,
    payloads: Sequence[bytes],
    run: QuotaRun,
    inflight: int,
    seconds: float,
) -> None:
    reserve = channel.unary_unary(
        f"{SERVICE}/ReserveQuota",
        request_serializer=None,
        response_deserializer=quota_pb2.Reservation.FromString,
    )
    settle = channel.unary_unary(
        f"{SERVICE}/SettleReservation",
        request_serializer=quota_pb2.SettleReservationRequest.SerializeToString,
        response_deserializer=quota_pb2.SettleReservationResponse.FromString,
    )
    floor = channel.unary_unary(
        ECHO_RPC, request_serializer=None, response_deserializer=echo_pb2.EchoResponse.FromString
    )
    deadline = time.perf_counter() + seconds
    counter = itertools.count()

    async def once(payload: bytes) -> None:
        if kind == FLOOR:
            await floor(payload, timeout=CALL_TIMEOUT_SECONDS)
            return
        reservation = await reserve(payload, timeout=CALL_TIMEOUT_SECONDS)
        if kind == PAIR:
            await settle(
                quota_pb2.SettleReservationRequest(
                    reservation_id=reservation.reservation_id,
                    outcome=quota_pb2.OUTCOME_COMMIT,
                ),
                timeout=CALL_TIMEOUT_SECONDS,
            )

    async def worker() -> None:
        while time.perf_counter() < deadline:
            payload = payloads[next(counter) % len(payloads)]
            started = time.perf_counter()
            try:
                await once(payload)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    run.refused += 1
                else:
                    run.errors += 1
                continue
            run.latencies_ms.append((time.perf_counter() - started) * 1000)
            run.reservations += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    run.seconds = time.perf_counter() - began


async def measure(
    quota_addr: str,
    pids: dict[str, int],
    rounds: int,
    seconds: float,
    warmup: float,
    inflight: int,
    floor_addr: str | None = None,
) -> list[QuotaRun]:
    """Warm each kind up, then alternate them `rounds` times."""
    payloads = {
        PAIR: guest_requests(consume=False),
        CONSUME: guest_requests(consume=True),
        FLOOR: [echo_pb2.EchoRequest(text="consume").SerializeToString()],
    }
    runs: list[QuotaRun] = []
    async with contextlib.AsyncExitStack() as stack:
        quota = await stack.enter_async_context(grpc.aio.insecure_channel(quota_addr))
        channels = {PAIR: quota, CONSUME: quota}
        if floor_addr is not None:
            channels[FLOOR] = await stack.enter_async_context(grpc.aio.insecure_channel(floor_addr))
        for kind, channel in channels.items():
            await _drive(channel, kind, payloads[kind], QuotaRun(kind), inflight, warmup)
        for _ in range(rounds):
            for kind, channel in channels.items():
                run = QuotaRun(kind)
                with CpuWindow({**pids, "client": os.getpid()}, alone=("client",)) as cpu:
                    await _drive(channel, kind, payloads[kind], run, inflight, seconds)
                run.cpu = cpu.used
                runs.append(run)
    return runs


def _summarize_kind(runs: Sequence[QuotaRun]) -> dict[str, Any]:
    names = list(runs[0].cpu)
    return {
        "per_second": statistics.median(r.rate for r in runs),
        "rounds": [r.rate for r in runs],
        "p50_ms": statistics.median(percentile(r.latencies_ms, 0.5) for r in runs),
        "p99_ms": statistics.median(percentile(r.latencies_ms, 0.99) for r in runs),
        "refused": sum(r.refused for r in runs),
        "errors": sum(r.errors for r in runs),
        "cpu_us_per_call": {
            n: median_known([per_unit_us(r.cpu.get(n), r.reservations) for r in runs])
            for n in names
        },
        "cpu_percent": {
            n: median_known([share_percent(r.cpu.get(n), r.seconds) for r in runs]) for n in names
        },
    }


def summarize(runs: Sequence[QuotaRun], inflight: int) -> dict[str, Any]:
    kinds = {
        kind: _summarize_kind(mine)
        for kind in KINDS
        if (mine := [run for run in runs if run.kind == kind])
    }
    return {
        "inflight": inflight,
        "kinds": kinds,
        "reservations_per_second": kinds[PAIR]["per_second"],
        "consumes_per_second": kinds[CONSUME]["per_second"],
    }


def print_quota(figures: dict[str, Any], rounds: int, seconds: float) -> None:
    print(
        f"Quota reservations of one quota process over gRPC, as generation makes them, guests, "
        f"{figures['inflight']} in flight, {rounds} alternating rounds x {seconds:g} s per kind; "
        "medians"
    )
    kinds: dict[str, dict[str, Any]] = figures["kinds"]
    names = list(dict.fromkeys(n for k in kinds.values() for n in k["cpu_us_per_call"]))
    header = (
        f"{'kind':<28} {'per s':>7} {'p50 ms':>7} {'p99 ms':>7} {'refused':>7} {'errors':>6}"
        + "".join(f" {n + ' µs':>12} {n + ' %':>9}" for n in names)
    )
    print(header)
    print("-" * len(header))
    for kind, k in kinds.items():
        cells = "".join(
            f" {fmt(k['cpu_us_per_call'].get(n), 12)} {fmt(k['cpu_percent'].get(n), 9, 0)}"
            for n in names
        )
        print(
            f"{kind:<28} {k['per_second']:>7,.0f} {k['p50_ms']:>7.2f} {k['p99_ms']:>7.2f} "
            f"{k['refused']:>7} {k['errors']:>6}{cells}"
        )
    for kind, k in kinds.items():
        print(f"  {kind}, per second per round: " + ", ".join(f"{r:,.0f}" for r in k["rounds"]))
    print(
        "  µs: CPU per reservation (a pair is two RPCs); %: share of one core. The floor is "
        "the floor's quota process, not the quota service."
    )
