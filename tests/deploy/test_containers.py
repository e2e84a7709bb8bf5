"""The images build here, and the dev overlay's pod specs run: `make images`, `make k8s-up` and
`make k8s-down` (deploy/podman/) as a test, with Podman.

- Every image builds (or is reused: its tag is a hash of what it is built from), and runs as
  its own non-root user on a read-only root, stubs and descriptor set inside.
- `k8s-up` runs the dev overlay with `podman kube play`; every container runs with the
  securityContext of its manifest (uid, read-only root, no capabilities, no-new-privileges).
- Every REST route of the protos answers through the gateway pod.
- `k8s-down` leaves nothing behind: no pod, container, secret, volume, database or Redis key.

Without Podman these tests cannot run: they are skipped with the reason, and the end of the
pytest report says so in its own section (in CI, CI=true, they fail instead).
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
import yaml
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from redis.asyncio import Redis

from deploy.podman import images as image_builder
from deploy.podman import kube
from deploy.podman.engine import Engine, EngineError, podman
from devstack import infra
from services.gateway.render import TRANSCODED_SERVICES
from tests.images import tiny_png

REPO = Path(__file__).resolve().parents[2]
DESCRIPTOR_SET = REPO / "gen" / "genmesh.pb"
UID = 10001

pytestmark = [
    pytest.mark.e2e,
    # A cold build (no layer cache, no base image) takes minutes; a warm run about one.
    pytest.mark.timeout(1500),
]


class NotRunReport:
    """A section at the end of the pytest report: these tests did not run, and why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.write_sep("=", "container tests NOT RUN", yellow=True, bold=True)
        terminalreporter.write_line(f"tests/deploy/test_containers.py: {self.reason}")


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest) -> Engine:
    try:
        return podman()
    except EngineError as err:
        reason = f"the container tests did not run: {err}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (.ci/run installs Podman)")
        manager = request.config.pluginmanager
        if not manager.has_plugin("genmesh-containers-not-run"):
            manager.register(NotRunReport(reason), "genmesh-containers-not-run")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def built(engine: Engine) -> dict[str, image_builder.Image]:
    began = time.monotonic()
    images = image_builder.build_all(engine)  # IMAGE_BASE from the environment, else auto
    print(f"images ready in {time.monotonic() - began:.1f}s")
    return images


# -- the images --------------------------------------------------------------------------------

# Run inside each image: who it runs as, whether its root is writable, its capabilities, and
# whether its code and generated files import.
IMAGE_CHECK = """
import importlib, json, os, pathlib, sys
try:
    pathlib.Path("/app/written").write_text("x")
    root = "writable"
except OSError as err:
    root = err.strerror
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
importlib.import_module(sys.argv[1])
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "root": root,
    "caps": status["CapEff"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
    "seccomp": status["Seccomp"].strip(), "pod_name": os.environ.get("POD_NAME"),
    "files": {p: pathlib.Path(p).exists() for p in sys.argv[2:]},
}))
"""

ENTRY = {
    "quota": "services.quota.app",
    "telemetry": "services.telemetry.app",
    "generation": "services.generation.app",
    "gateway": "services.gateway.render",
}
STUBS = [
    "/app/gen/python/genmesh/quota/v1/quota_pb2.py",
    "/app/gen/genmesh.pb",
    "/app/gen/envoy-api.pb",
]
# What each image must hold besides its code: the generated files, Envoy, the migrations (run
# by the init containers of the quota and telemetry pods).
GENERATED = {
    "gateway": ["/app/gen/genmesh.pb", "/opt/venv/bin/envoy"],
    "generation": STUBS,
    "quota": [*STUBS, "/app/migrations/0001_schema.sql"],
    "telemetry": [*STUBS, "/app/migrations/0001_schema.sql"],
}


@pytest.mark.parametrize("service", image_builder.SERVICES)
def test_each_image_runs_as_non_root_on_a_read_only_root(
    engine: Engine, built: dict[str, image_builder.Image], service: str
) -> None:
    image = built[service]
    user = engine.run("image", "inspect", "--format", "{{.Config.User}}", image.ref).stdout
    assert user.strip() == str(UID), f"{image.ref} runs as {user.strip()!r}"
    files = GENERATED[service]
    # No --user: the image's own USER must be non-root.
    result = engine.run(
        "run",
        "--rm",
        "--network",
        "none",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        image.ref,
        "python3",
        "-c",
        IMAGE_CHECK,
        ENTRY[service],
        *files,
    )
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["uid"] == UID and seen["gid"] != 0, seen
    assert seen["root"] == "Read-only file system", seen
    assert seen["caps"] == "0000000000000000" and seen["no_new_privs"] == "1", seen
    assert all(seen["files"].values()), f"missing from {image.ref}: {seen['files']}"


# -- k8s-up ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("k8s-state")


@pytest.fixture(scope="module")
def running(
    engine: Engine,
    built: dict[str, image_builder.Image],
    postgres_server: infra.Server,
    redis_server: infra.Server | None,
    state_dir: Path,
) -> Iterator[kube.Running]:
    began = time.monotonic()
    try:
        deployment = kube.up(
            state_dir,
            postgres_url=postgres_server.url,
            redis_url=redis_server.url if redis_server else "",
            gateway_port=infra.free_port(),
            images={f"genmesh/{name}": image.ref for name, image in built.items()},
            timeout=150,
        )
        print(f"k8s-up took {time.monotonic() - began:.1f}s")
        yield deployment
    finally:
        kube.down(state_dir, quiet=True)


def played(state_dir: Path) -> list[dict[str, Any]]:
    """The pod specs k8s-up handed to `podman kube play`, with the pod each became."""
    docs = list(yaml.safe_load_all((state_dir / "workloads.yaml").read_text()))
    docs += list(yaml.safe_load_all((state_dir / "simulator.yaml").read_text()))
    return [d for d in docs if d and d["kind"] in ("Deployment", "Pod")]


def test_every_pod_runs_with_the_security_context_of_its_manifest(
    engine: Engine, running: kube.Running, state_dir: Path
) -> None:
    checked = []
    for obj in played(state_dir):
        spec = obj["spec"]["template"]["spec"] if obj["kind"] == "Deployment" else obj["spec"]
        pod_sc = spec.get("securityContext", {})
        for container in spec["containers"]:
            sc = {**pod_sc, **container["securityContext"]}
            name = kube.find_container(
                engine, running.state.run_id, obj["metadata"]["name"], container["name"]
            )
            (info,) = json.loads(engine.run("container", "inspect", name).stdout)
            user = f"{sc['runAsUser']}:{sc['runAsGroup']}"
            assert info["Config"]["User"] == user, name
            assert info["HostConfig"]["ReadonlyRootfs"] is sc["readOnlyRootFilesystem"] is True
            assert not info["EffectiveCaps"], (name, info["EffectiveCaps"])
            assert "no-new-privileges" in info["HostConfig"]["SecurityOpt"], name
            limits = container["resources"]["limits"]
            assert info["HostConfig"]["Memory"] == memory_bytes(limits["memory"]), name
            assert info["HostConfig"]["NanoCpus"] == nano_cpus(limits["cpu"]), name
            # And from inside the running process: what the kernel enforces.
            seen = json.loads(
                engine.run(
                    "exec", name, "python3", "-c", IMAGE_CHECK, "services", "/tmp"
                ).stdout.strip()
            )
            assert seen["uid"] == sc["runAsUser"] and seen["gid"] == sc["runAsGroup"], seen
            assert seen["root"] == "Read-only file system", (name, seen)
            assert seen["caps"] == "0000000000000000" and seen["no_new_privs"] == "1", seen
            assert seen["seccomp"] == "2", (name, seen)  # a seccomp filter (RuntimeDefault)
            downward = [e for e in container.get("env", []) if "fieldRef" in e.get("valueFrom", {})]
            if downward:  # POD_NAME from the downward API
                assert seen["pod_name"], (name, seen)
            checked.append(container["name"])
    assert sorted(checked) == ["gateway", "generation", "quota", "simulator", "telemetry"]


def nano_cpus(quantity: str | int) -> int:
    text = str(quantity)
    return int(text[:-1]) * 10**6 if text.endswith("m") else int(float(text) * 10**9)


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


# -- every REST route through the gateway pod ---------------------------------------------------


def rest_routes() -> set[tuple[str, str]]:
    """(method, path) of every google.api.http annotation of the services the gateway
    transcodes, from the descriptor set."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    routes = set()
    for file in fds.file:
        for service in file.service:
            if f"{file.package}.{service.name}" not in TRANSCODED_SERVICES:
                continue
            for method in service.method:
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                rule = method.options.Extensions[annotations_pb2.http]
                verb = rule.WhichOneof("pattern")
                assert verb is not None
                routes.add((verb.upper(), getattr(rule, verb)))
    return routes


Call = Callable[[httpx.Client, kube.Running], None]


def _auth(running: kube.Running, user: str) -> dict[str, str]:
    issuer = running.settings["gateway"]["SUPABASE_URL"].rstrip("/") + "/auth/v1"
    claims = {
        "sub": user,
        "role": "authenticated",
        "aud": "authenticated",
        "iss": issuer,
        "exp": int(time.time()) + 600,
        "email": "ada@example.com",
    }
    token = jwt.encode(claims, running.secrets["SUPABASE_JWT_SECRET"], algorithm="HS256")
    return {"authorization": f"Bearer {token}"}


def _admin(running: kube.Running) -> dict[str, str]:
    return {"x-admin-token": running.secrets["GENMESH_ADMIN_TOKEN"]}


def generate(http: httpx.Client, running: kube.Running) -> None:
    headers = _auth(running, f"k8s-{uuid.uuid4()}")
    body = {"text": f"Name a colour {uuid.uuid4()}", "lang": "en"}
    first = http.post("/api/generate", json=body, headers=headers)
    assert first.status_code == 200, first.text
    assert first.json()["text"] and first.json()["cached"] is False
    again = http.post("/api/generate", json=body, headers=headers)
    assert again.status_code == 200 and again.json()["cached"] is True, again.text
    image = {
        "text": "What is this?",
        "image_data": base64.b64encode(tiny_png()).decode(),
        "image_mime_type": "image/png",
    }
    vision = http.post("/api/generate", json=image, headers=headers)
    assert vision.status_code == 200 and "image/png" in vision.json()["text"], vision.text
    assert http.post("/api/generate", json={"text": ""}).status_code == 400


def stream(http: httpx.Client, running: kube.Running) -> None:
    body = {"text": f"Tell me a story {uuid.uuid4()}"}
    events = []
    headers = _auth(running, f"k8s-{uuid.uuid4()}")
    with http.stream("POST", "/api/generate:stream", json=body, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert "done" in events[-1] and any("delta" in e for e in events), events


def admin_cache(http: httpx.Client, running: kube.Running) -> None:
    assert http.get("/api/admin/cache").status_code == 401
    r = http.get("/api/admin/cache", headers=_admin(running))
    assert r.status_code == 200, r.text


def admin_cache_invalidate(http: httpx.Client, running: kube.Running) -> None:
    r = http.post("/api/admin/cache:invalidate", json={"all": True}, headers=_admin(running))
    assert r.status_code == 200, r.text


def admin_performance(http: httpx.Client, running: kube.Running) -> None:
    r = http.get("/api/admin/performance", headers=_admin(running))
    assert r.status_code == 200, r.text


def quota(http: httpx.Client, running: kube.Running) -> None:
    r = http.get("/api/quota")
    assert r.status_code == 200, r.text
    assert r.json()["plan"] == "guest"


def profile(http: httpx.Client, running: kube.Running) -> None:
    assert http.get("/api/profile").status_code == 401
    user = f"k8s-{uuid.uuid4()}"
    r = http.get("/api/profile", headers=_auth(running, user))
    assert r.status_code == 200, r.text
    assert r.json()["user_id"] == user and r.json()["plan"] == "free"


def admin_blocks(http: httpx.Client, running: kube.Running) -> None:
    r = http.get("/api/admin/blocks", headers=_admin(running))
    assert r.status_code == 200, r.text


def admin_blocks_lift(http: httpx.Client, running: kube.Running) -> None:
    body = {"scope": "ip", "subject": "203.0.113.9"}
    r = http.post("/api/admin/blocks:lift", json=body, headers=_admin(running))
    assert r.status_code == 200, r.text
    assert not r.json().get("lifted", False)


def feedback(http: httpx.Client, running: kube.Running) -> None:
    r = http.post("/api/feedback", json={"rating": 5, "comment": "from the pods", "lang": "en"})
    assert r.status_code == 200, r.text
    assert http.post("/api/feedback", json={"rating": 9}).status_code == 400


def wishlist(http: httpx.Client, running: kube.Running) -> None:
    r = http.post("/api/wishlist", json={"email": f"k8s-{uuid.uuid4().hex[:8]}@example.com"})
    assert r.status_code == 200, r.text


def events(http: httpx.Client, running: kube.Running) -> None:
    batch = [{"event_id": str(uuid.uuid4()), "event": "page_view", "session_id": "k8s"}]
    r = http.post("/api/events", json={"events": batch})
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 1, "duplicates": 0}


def health(http: httpx.Client, running: kube.Running) -> None:
    r = http.get("/api/health")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "healthy", r.text


def admin_health(http: httpx.Client, running: kube.Running) -> None:
    r = http.get("/api/admin/health", headers=_admin(running))
    assert r.status_code == 200, r.text


CALLS: dict[tuple[str, str], Call] = {
    ("POST", "/api/generate"): generate,
    ("POST", "/api/generate:stream"): stream,
    ("GET", "/api/admin/cache"): admin_cache,
    ("POST", "/api/admin/cache:invalidate"): admin_cache_invalidate,
    ("GET", "/api/admin/performance"): admin_performance,
    ("GET", "/api/quota"): quota,
    ("GET", "/api/profile"): profile,
    ("GET", "/api/admin/blocks"): admin_blocks,
    ("POST", "/api/admin/blocks:lift"): admin_blocks_lift,
    ("POST", "/api/feedback"): feedback,
    ("POST", "/api/wishlist"): wishlist,
    ("POST", "/api/events"): events,
    ("GET", "/api/health"): health,
    ("GET", "/api/admin/health"): admin_health,
}


def test_every_rest_route_answers_through_the_gateway_pod(running: kube.Running) -> None:
    assert set(CALLS) == rest_routes(), "a REST route was added or removed: update CALLS"
    failures = []
    with httpx.Client(base_url=running.gateway_url, timeout=30) as http:
        for (method, path), call in CALLS.items():
            try:
                call(http, running)
            except AssertionError as err:
                failures.append(f"{method} {path}: {err}")
    assert not failures, "\n".join(failures)


# -- k8s-down ----------------------------------------------------------------------------------


def test_k8s_down_leaves_nothing_behind(
    engine: Engine, running: kube.Running, state_dir: Path
) -> None:
    state = running.state
    assert kube.down(state_dir) is True
    label = f"label={kube.RUN_LABEL}={state.run_id}"
    assert engine.run("pod", "ps", "--filter", label, "--format", "{{.Name}}").stdout.split() == []
    leftover = engine.run("ps", "--all", "--format", "{{.Names}}").stdout.split()
    assert [c for c in leftover if state.prefix in c] == []
    secrets = engine.run("secret", "ls", "--format", "{{.Name}}").stdout.split()
    assert [s for s in secrets if s.startswith(state.prefix)] == []
    volumes = engine.run("volume", "ls", "--format", "{{.Name}}").stdout.split()
    assert [v for v in volumes if v.startswith(state.prefix)] == []
    assert not (state_dir / "state.json").exists()
    assert kube.down(state_dir, quiet=True) is False  # a second down is a no-op


async def test_k8s_down_drops_the_database_and_the_redis_keys(running: kube.Running) -> None:
    state = running.state
    conn = await asyncpg.connect(infra.with_database(state.postgres_url, "postgres"))
    try:
        found = await conn.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname = $1", state.database
        )
    finally:
        await conn.close()
    assert found == 0
    if state.redis_url:
        client = Redis.from_url(state.redis_url)
        try:
            keys = [k async for k in client.scan_iter(match=f"{state.redis_prefix}*")]
        finally:
            await client.aclose()
        assert keys == []
