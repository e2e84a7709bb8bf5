"""PostgreSQL and Redis for local runs and tests, in this order of preference:
the URL from the environment (`DATABASE_URL` / `REDIS_URL`), else the local server on its
standard port, else a private server started from the installed binaries in a scratch folder.
With no Redis at all, the services use their documented in-memory fallback."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from redis.asyncio import Redis

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"


class InfraError(RuntimeError):
    """A dependency could not be found or started; the message says what to install."""


# prctl(2): the signal a process gets when the thread that created it exits.
_PR_SET_PDEATHSIG = 1


def die_with_parent(death_signal: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get `death_signal` when this process dies, however
    it dies (SIGKILL included), so nothing `make run` or a test started outlives it. Linux
    only (PR_SET_PDEATHSIG); None elsewhere, and None off the main thread: the signal follows
    the *thread* that forked, and a worker thread (asyncio.to_thread) may end long before the
    process. The setting survives exec (of binaries that are not set-user-ID), and children
    given a user (`Popen(user=...)`) switch before it is set, which would otherwise clear it.

    A preexec_fn runs Python in the forked child, which is unsafe only if it takes a lock
    another thread held at the fork: this one imports nothing and calls only sigaction,
    prctl, getppid and _exit (gRPC's fork handlers, the other risk, are off by default)."""
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm() -> None:
        # Until exec the child runs this process's signal handlers: the default action, so a
        # parent that dies from here on kills the child even before it execs.
        signal.signal(death_signal, signal.SIG_DFL)
        if prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(126)

    return arm


@dataclass
class Server:
    """A server to use: `url` points at it; `process` is set when we started it ourselves."""

    kind: str
    url: str
    origin: str  # "environment", "local" or "private"
    process: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    extra_stop: list[list[str]] = field(default_factory=list)
    # How to ask it to stop (PostgreSQL: SIGINT, its fast shutdown; SIGTERM would wait for
    # every client to disconnect).
    stop_signal: int = signal.SIGTERM

    def stop(self) -> None:
        for cmd in self.extra_stop:
            subprocess.run(cmd, check=False, capture_output=True, timeout=30)
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


# Ports handed out by this process: a port is bound by its user only later, so the same one
# must not be handed out twice meanwhile.
_HANDED_OUT: set[int] = set()
_FALLBACK_EPHEMERAL_LOW = 32768  # Linux's default, where /proc says nothing


def _ephemeral_low() -> int:
    try:
        low = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
        return int(low)
    except (OSError, ValueError, IndexError):
        return _FALLBACK_EPHEMERAL_LOW


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range: a port the kernel picks
    for bind(0) is in that range, where any outgoing connection made before our server
    binds it may take it ("Address already in use")."""
    low = _ephemeral_low()
    lowest = 10_000 if low > 11_000 else 1024
    for _ in range(200):
        port = random.randrange(lowest, low)  # noqa: S311 - not for security
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # a crowded range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        chosen: int = s.getsockname()[1]
        return chosen


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise InfraError(f"{what} exited with code {proc.returncode} while starting")
        if port_open("127.0.0.1", port):
            return
        time.sleep(0.1)
    raise InfraError(f"{what} did not open port {port} within {timeout:.0f}s")


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    return str(candidates[0]) if candidates else None


def _local_postgres_answers() -> bool:
    if not port_open("127.0.0.1", 5432):
        return False
    psql = shutil.which("psql")
    if psql is None:
        return True
    probe = subprocess.run(
        [psql, LOCAL_POSTGRES, "-tAc", "SELECT 1"], capture_output=True, timeout=10, check=False
    )
    return probe.returncode == 0


def postgres(scratch: Path) -> Server:
    """A PostgreSQL server URL (without a database name: callers choose their database)."""
    if url := os.environ.get("DATABASE_URL"):
        return Server("postgres", url, "environment")
    if _local_postgres_answers():
        return Server("postgres", LOCAL_POSTGRES, "local")
    return private_postgres(scratch)


def private_postgres(scratch: Path) -> Server:
    """A throwaway PostgreSQL server from the installed binaries, in `scratch`."""
    initdb, server_bin = _postgres_bin("initdb"), _postgres_bin("postgres")
    if initdb is None or server_bin is None:
        raise InfraError(
            "PostgreSQL is not reachable on 127.0.0.1:5432 and its binaries are not installed: "
            "set DATABASE_URL, start a local server, or install it "
            "(Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql)"
        )
    # PostgreSQL refuses to run as root: as root, run it as the postgres user (directly, not
    # through runuser, whose extra process would stand between it and die_with_parent), in a
    # folder of its own (it may not be able to reach into root's scratch folders).
    as_user: dict[str, object] = {}
    if os.geteuid() == 0:
        as_user = {"user": "postgres", "group": "postgres", "extra_groups": []}
        workdir = Path(tempfile.mkdtemp(prefix="genmesh-postgres-"))
        shutil.chown(workdir, "postgres", "postgres")
    else:
        workdir = scratch / "postgres"
        workdir.mkdir(parents=True, exist_ok=True)
        # What a killed run left (its server died with it): a throwaway, start afresh.
        shutil.rmtree(workdir / "data", ignore_errors=True)
    data = workdir / "data"
    init = subprocess.run(
        [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=workdir,
        **as_user,  # type: ignore[call-overload]
    )
    if init.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise InfraError(f"initdb failed: {init.stderr.strip() or init.stdout.strip()}")
    port = free_port()
    proc = subprocess.Popen(
        [
            server_bin,
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(workdir),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",  # a throwaway server: durability of its files does not matter
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "postgres.log").open("wb"),
        start_new_session=True,
        cwd=workdir,
        # Dies with us, by its fast shutdown (sessions ended, a clean stop).
        preexec_fn=die_with_parent(signal.SIGINT),  # noqa: PLW1509 - see die_with_parent
        **as_user,  # type: ignore[call-overload]
    )
    _wait_port(port, proc, "postgres")
    return Server(
        "postgres",
        f"postgresql://postgres@127.0.0.1:{port}/postgres",
        "private",
        process=proc,
        workdir=workdir,
        stop_signal=signal.SIGINT,
    )


def redis(scratch: Path) -> Server | None:
    """A Redis URL, or None for the in-memory fallback (REDIS_URL set to an empty string
    asks for that explicitly)."""
    if "REDIS_URL" in os.environ:
        url = os.environ["REDIS_URL"]
        return Server("redis", url, "environment") if url else None
    if port_open("127.0.0.1", 6379):
        return Server("redis", LOCAL_REDIS, "local")
    return private_redis(scratch)


def _redis_server(binary: str, port: int, workdir: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A redis-server on loopback that keeps nothing on disk, logging into `workdir`."""
    return subprocess.Popen(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            *extra,
        ],
        stdout=(workdir / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent(),  # noqa: PLW1509 - see die_with_parent
    )


def private_redis(scratch: Path, port: int | None = None) -> Server | None:
    """A throwaway Redis server from the installed binary, or None when there is none.
    `port` restarts one where an earlier one listened (tests of a Redis outage)."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    workdir = scratch / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc = _redis_server(binary, port, workdir)
    _wait_port(port, proc, "redis-server")
    return Server("redis", f"redis://127.0.0.1:{port}/0", "private", process=proc, workdir=workdir)


@dataclass
class PrivateRedisCluster:
    """A throwaway Redis Cluster of `len(nodes)` primaries (no replicas), for tests that must
    prove their scripts run unchanged on Redis Cluster. `url` is any node (a seed)."""

    ports: list[int]
    nodes: list[Server]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def private_redis_cluster(scratch: Path, size: int = 3) -> PrivateRedisCluster:
    """Start `size` redis-server processes with cluster mode on and join them into one cluster
    (`redis-cli --cluster create`), each primary owning a third of the 16384 hash slots."""
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None:
        raise InfraError("Redis Cluster needs redis-server and redis-cli (apt-get install redis)")
    nodes: list[Server] = []
    ports: list[int] = []
    try:
        for _ in range(size):
            port = _free_cluster_port()
            workdir = Path(tempfile.mkdtemp(prefix=f"redis-cluster-{port}-", dir=scratch))
            cluster_mode = ["--cluster-enabled", "yes"]
            cluster_mode += ["--cluster-config-file", str(workdir / "nodes.conf")]
            proc = _redis_server(binary, port, workdir, *cluster_mode)
            url = f"redis://127.0.0.1:{port}/0"
            nodes.append(Server("redis", url, "private", process=proc, workdir=workdir))
            ports.append(port)
            _wait_port(port, proc, "redis-server (cluster node)")
        create = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if create.returncode != 0:
            raise InfraError(f"redis-cli --cluster create failed: {create.stdout}{create.stderr}")
        _wait_cluster_ok(cli, ports)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return PrivateRedisCluster(ports, nodes)


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000, Redis's rule) is free and valid."""
    for _ in range(100):
        port = free_port()
        if port + 10000 < 65536 and not port_open("127.0.0.1", port + 10000):
            return port
    raise InfraError("no free port pair for a Redis Cluster node")


def _wait_cluster_ok(cli: str, ports: list[int], timeout: float = 30) -> None:
    """Every node must see the whole cluster as ok before clients are pointed at it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [
            subprocess.run(
                [cli, "-p", str(port), "cluster", "info"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout
            for port in ports
        ]
        if all("cluster_state:ok" in state for state in states):
            return
        time.sleep(0.2)
    raise InfraError(f"Redis Cluster on ports {ports} did not reach cluster_state:ok")


def with_database(server_url: str, database: str) -> str:
    """The same server, another database."""
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{database}"))


async def drop_database(server_url: str, name: str) -> None:
    """Drop a scratch database (tests, benchmarks), closing its connections first."""
    conn = await asyncpg.connect(with_database(server_url, "postgres"))
    try:
        quoted = await conn.fetchval("SELECT quote_ident($1)", name)
        await conn.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
    finally:
        await conn.close()


async def delete_keys(redis_url: str, prefix: str) -> None:
    """Delete every key under a scratch prefix (tests, benchmarks); never FLUSHDB."""
    client = Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
