"""Quota reservations per second of one quota process, in `make bench`: ReserveQuota then
SettleReservation(COMMIT), the two internal gRPC calls generation makes for every generate
request (services/generation/quota_client.py), from a fixed number of workers with one pair in
flight each, as guests (the bench's generate traffic is a guest's: the reservation lives in
Redis) from many client networks.

A reservation here is the pair: reservations/s = pairs completed per second, each two RPCs.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.proc import CpuWindow
from bench.stats import fmt, median_known, per_unit_us, percentile, share_percent
from genmesh.quota.v1 import quota_pb2

SERVICE = "/genmesh.quota.v1.QuotaService"
CALL_TIMEOUT_SECONDS = 5.0
# Distinct guest networks cycled through (10.<n>.<m>.1), as many clients would be.
GUESTS = 1024


@dataclass
class QuotaRun:
    reservations: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    refused: int = 0
    errors: int = 0
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.reservations / self.seconds if self.seconds else 0.0


def guest_requests() -> list[bytes]:
    """Serialized ReserveQuotaRequests, made once so the client spends its CPU on calls."""
    return [
        quota_pb2.ReserveQuotaRequest(
            caller=quota_pb2.Caller(client_ip=f"10.{i >> 8 & 255}.{i & 255}.1")
        ).SerializeToString()
        for i in range(GUESTS)
    ]


async def _drive(
    channel: grpc.aio.Channel,
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
    deadline = time.perf_counter() + seconds
    counter = itertools.count()

    async def worker() -> None:
        while time.perf_counter() < deadline:
            payload = payloads[next(counter) % len(payloads)]
            started = time.perf_counter()
            try:
                reservation = await reserve(payload, timeout=CALL_TIMEOUT_SECONDS)
                await settle(
                    quota_pb2.SettleReservationRequest(
                        reservation_id=reservation.reservation_id,
                        outcome=quota_pb2.OUTCOME_COMMIT,
                    ),
                    timeout=CALL_TIMEOUT_SECONDS,
                )
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
) -> list[QuotaRun]:
    payloads = guest_requests()
    runs: list[QuotaRun] = []
    async with grpc.aio.insecure_channel(quota_addr) as channel:
        await _drive(channel, payloads, QuotaRun(), inflight, warmup)
        for _ in range(rounds):
            run = QuotaRun()
            with CpuWindow({**pids, "client": os.getpid()}, alone=("client",)) as cpu:
                await _drive(channel, payloads, run, inflight, seconds)
            run.cpu = cpu.used
            runs.append(run)
    return runs


def summarize(runs: Sequence[QuotaRun], inflight: int) -> dict[str, Any]:
    names = list(runs[0].cpu)
    return {
        "calls": "ReserveQuota + SettleReservation(COMMIT), guests",
        "inflight": inflight,
        "reservations_per_second": statistics.median(r.rate for r in runs),
        "rounds": [r.rate for r in runs],
        "p50_ms": statistics.median(percentile(r.latencies_ms, 0.5) for r in runs),
        "p99_ms": statistics.median(percentile(r.latencies_ms, 0.99) for r in runs),
        "refused": sum(r.refused for r in runs),
        "errors": sum(r.errors for r in runs),
        "cpu_us_per_reservation": {
            n: median_known([per_unit_us(r.cpu.get(n), r.reservations) for r in runs])
            for n in names
        },
        "cpu_percent": {
            n: median_known([share_percent(r.cpu.get(n), r.seconds) for r in runs]) for n in names
        },
    }


def print_quota(figures: dict[str, Any], rounds: int, seconds: float) -> None:
    print(
        f"Quota reservations of one quota process: {figures['calls']} over gRPC, as generation "
        f"makes them, {figures['inflight']} pairs in flight, {rounds} x {seconds:g} s; medians"
    )
    rounds_text = ", ".join(f"{r:,.0f}" for r in figures["rounds"])
    print(
        f"reservations/s {figures['reservations_per_second']:,.0f} (rounds: {rounds_text}; "
        f"{2 * figures['reservations_per_second']:,.0f} RPCs/s), pair p50 "
        f"{figures['p50_ms']:.2f} ms, p99 {figures['p99_ms']:.2f} ms, refused "
        f"{figures['refused']}, errors {figures['errors']}"
    )
    for name, per in figures["cpu_us_per_reservation"].items():
        print(
            f"  {name:<10} CPU {fmt(per, 7)} µs per reservation, "
            f"{fmt(figures['cpu_percent'][name], 3, 0)} % of a core"
        )
