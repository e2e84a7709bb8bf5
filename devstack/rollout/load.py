"""The drill's clients: steady REST load (cache hits, cache misses, funnel events, quota reads)
over HTTP/1.1 keep-alive connections spread over the Envoys the drill names, in an asyncio loop
on a thread of its own (the drill's main thread starts and stops processes, which must happen
on the main thread: see devstack.infra.die_with_parent).

Nothing is retried: a request that gets no 2xx answer, or no answer, is a failed request. Each
worker keeps one connection to one Envoy, as a browser or an upstream proxy does, and opens a
new one (to the next Envoy the balancer offers) only when the old one is closed: after a
response with `Connection: close` (what a draining Envoy sends) or after a failure."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx

# Request kinds and their share of the load (weights).
GENERATE_HIT = "generate (cache hit)"
GENERATE_MISS = "generate (cache miss)"
EVENTS = "events"
QUOTA = "quota"
MIX = ((GENERATE_HIT, 3), (GENERATE_MISS, 2), (EVENTS, 3), (QUOTA, 2))
# Prompts the warm-up puts in the cache, so asking them again is a hit.
HOT_PROMPTS = 8
EVENTS_PER_REQUEST = 5
REQUEST_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Sample:
    phase: str
    kind: str
    outcome: str  # "ok", "HTTP 503", or the exception's name when no answer came
    latency_ms: float
    envoy: str

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


class Balancer:
    """What a layer-4 load balancer in front of the Envoys does (kube-proxy, a cloud load
    balancer): each new connection goes to the next Envoy it lists, round robin; a connection
    stays with the Envoy it was opened to. The drill adds an Envoy once it routes and removes
    one before draining it (the endpoint leaving the Service)."""

    def __init__(self, urls: list[str]) -> None:
        self._urls = list(urls)
        self._turn = 0
        self._lock = threading.Lock()

    def add(self, url: str) -> None:
        with self._lock:
            self._urls.append(url)

    def remove(self, url: str) -> None:
        with self._lock:
            self._urls.remove(url)

    @property
    def urls(self) -> list[str]:
        with self._lock:
            return list(self._urls)

    def pick(self) -> str:
        with self._lock:
            url = self._urls[self._turn % len(self._urls)]
            self._turn += 1
            return url


def _request(kind: str, run: str, rng: random.Random) -> tuple[str, str, dict[str, object] | None]:
    if kind == GENERATE_HIT:
        return "POST", "/api/generate", {"text": f"rollout {run} hot {rng.randrange(HOT_PROMPTS)}"}
    if kind == GENERATE_MISS:
        return "POST", "/api/generate", {"text": f"rollout {run} miss {uuid.uuid4().hex}"}
    if kind == EVENTS:
        events = [
            {"event_id": str(uuid.uuid4()), "event": "rollout_drill", "session_id": run}
            for _ in range(EVENTS_PER_REQUEST)
        ]
        return "POST", "/api/events", {"events": events}
    return "GET", "/api/quota", None


@dataclass
class Load:
    """`rate` requests per second in all, from `workers` connections."""

    balancer: Balancer
    rate: float
    workers: int
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    # The phase the drill is in; each sample is filed under the phase its request started in.
    phase: str = "warm-up"
    samples: list[Sample] = field(default_factory=list)
    # Connections opened, per Envoy.
    connections: Counter[str] = field(default_factory=Counter)
    # Connections httpx replaced by itself: it found the kept-alive one closed by the server
    # before sending on it (as browsers do). No request was sent on the closed one.
    silent_reconnects: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def warm(self) -> None:
        """Ask every hot prompt once (through the first Envoy), so later asks are hits."""

        async def warm() -> None:
            async with httpx.AsyncClient(
                base_url=self.balancer.urls[0], timeout=REQUEST_TIMEOUT_SECONDS
            ) as client:
                for n in range(HOT_PROMPTS):
                    reply = await client.post(
                        "/api/generate", json={"text": f"rollout {self.run} hot {n}"}
                    )
                    reply.raise_for_status()

        asyncio.run(warm())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="rollout-load", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sending; returns once every request in flight has its outcome."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=REQUEST_TIMEOUT_SECONDS + 10)
        if self._error is not None:
            raise RuntimeError("the load generator failed") from self._error

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as err:  # reported by stop()
            self._error = err

    async def _run(self) -> None:
        await asyncio.gather(*(self._worker(n) for n in range(self.workers)))

    async def _worker(self, number: int) -> None:
        rng = random.Random(f"{self.run}-{number}")  # noqa: S311 - a load mix, not a secret
        kinds = [kind for kind, weight in MIX for _ in range(weight)]
        interval = self.workers / self.rate
        # Spread the workers' first requests over one interval.
        next_at = time.monotonic() + interval * number / self.workers
        client: httpx.AsyncClient | None = None
        envoy = ""
        stream: object = None  # the connection the last answer came on
        try:
            while not self._stop.is_set():
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                # Steady, not bursty: a late request does not make the next ones catch up.
                next_at = max(next_at + interval, time.monotonic())
                if client is None:
                    envoy = self.balancer.pick()
                    client = self._connect(envoy)
                    self.connections[envoy] += 1
                    stream = None
                kind = rng.choice(kinds)
                method, path, body = _request(kind, self.run, rng)
                phase = self.phase
                started = time.perf_counter()
                close = False
                try:
                    reply = await client.request(method, path, json=body)
                    outcome = (
                        "ok" if 200 <= reply.status_code < 300 else f"HTTP {reply.status_code}"
                    )
                    close = reply.headers.get("connection", "").lower() == "close"
                    now_on = reply.extensions.get("network_stream")
                    if stream is not None and now_on is not stream:
                        self.silent_reconnects += 1
                    stream = now_on
                except httpx.HTTPError as err:
                    outcome, close = type(err).__name__, True
                latency = (time.perf_counter() - started) * 1000
                self.samples.append(Sample(phase, kind, outcome, latency, envoy))
                if close:
                    await client.aclose()
                    client = None
        finally:
            if client is not None:
                with contextlib.suppress(httpx.HTTPError):
                    await client.aclose()

    @staticmethod
    def _connect(envoy: str) -> httpx.AsyncClient:
        """One keep-alive HTTP/1.1 connection to one Envoy; httpx retries nothing (retries=0
        is its default: not even a failed connect)."""
        return httpx.AsyncClient(
            base_url=envoy,
            timeout=REQUEST_TIMEOUT_SECONDS,
            transport=httpx.AsyncHTTPTransport(
                retries=0, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)
            ),
        )
