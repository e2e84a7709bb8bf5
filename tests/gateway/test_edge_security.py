"""Edge security through a real Envoy: who a token makes the caller (issuer, audience, keys from
a JWKS file or URL), the role claim, CORS, header limits, the admin credential descriptor the
rate limit service sees, and the ops listener that replaces a public admin API."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from devstack.infra import free_port
from tests.gateway.harness import (
    ISSUER,
    MAX_BYTES,
    SECRET,
    Gateway,
    Upstream,
    assert_json_error,
    echoed,
    load,
    ops_listener,
    start_gateway,
    stop,
    token,
)

ORIGIN = "https://app.example.com"


@dataclass
class Keys:
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = json.loads(RSAAlgorithm.to_jwk(self.rsa.public_key()))
        ec_jwk = json.loads(ECAlgorithm.to_jwk(self.ec.public_key()))
        return {
            "keys": [
                {**rsa_jwk, "kid": "rsa-1", "alg": "RS256", "use": "sig"},
                {**ec_jwk, "kid": "ec-1", "alg": "ES256", "use": "sig"},
            ]
        }


def signed(key: Any, algorithm: str, kid: str, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": "authenticated", "iat": now, "exp": now + 600, **claims}
    return jwt.encode(payload, key, algorithm=algorithm, headers={"kid": kid})


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
    )


@pytest.fixture(scope="module")
async def jwks_file_gateway(
    upstream: Upstream, keys: Keys, tmp_path_factory: pytest.TempPathFactory, descriptor_set: Path
) -> AsyncIterator[Gateway]:
    """Asymmetric keys only, from a local JWKS file; CORS for one web origin."""
    directory = tmp_path_factory.mktemp("envoy-jwks-file")
    jwks = directory / "jwks.json"
    jwks.write_text(json.dumps(keys.jwks()))
    running, process = await start_gateway(
        directory,
        upstream.port,
        "",
        MAX_BYTES,
        GATEWAY_JWKS_FILE=str(jwks),
        # Spelt as an operator might: browsers send it as http://localhost:5173.
        GATEWAY_CORS_ORIGINS=f"{ORIGIN}, HTTP://LocalHost:5173",
    )
    yield running
    stop(process)


@dataclass
class JwksServer:
    url: str
    fetches: int = 0


@pytest.fixture(scope="module")
async def jwks_server(keys: Keys) -> AsyncIterator[JwksServer]:
    """Supabase's JWKS endpoint, served in the test loop, counting fetches."""
    port = free_port()
    server = JwksServer(url=f"http://127.0.0.1:{port}/auth/v1/.well-known/jwks.json")

    async def serve(request: web.Request) -> web.Response:
        server.fetches += 1
        return web.json_response(keys.jwks())

    app = web.Application()
    app.router.add_get("/auth/v1/.well-known/jwks.json", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield server
    await runner.cleanup()


@pytest.fixture(scope="module")
async def jwks_url_gateway(
    upstream: Upstream,
    jwks_server: JwksServer,
    tmp_path_factory: pytest.TempPathFactory,
    descriptor_set: Path,
) -> AsyncIterator[Gateway]:
    """The HS256 secret and a remote JWKS at once (a project moving to asymmetric keys)."""
    running, process = await start_gateway(
        tmp_path_factory.mktemp("envoy-jwks-url"),
        upstream.port,
        SECRET,
        MAX_BYTES,
        GATEWAY_JWKS_URL=jwks_server.url,
    )
    yield running
    stop(process)


async def get_health(gateway: Gateway, bearer: str = "", **headers: str) -> httpx.Response:
    if bearer:
        headers["authorization"] = f"Bearer {bearer}"
    async with httpx.AsyncClient(base_url=gateway.url, timeout=20) as http:
        return await http.get("/api/health", headers=headers)


# -- issuer, audience, validity ----------------------------------------------------------------


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"iss": "https://other.supabase.co/auth/v1"}, id="wrong-issuer"),
        pytest.param({"iss": None}, id="no-issuer"),
        pytest.param({"aud": "anon"}, id="wrong-audience"),
        pytest.param({"aud": None}, id="no-audience"),
        pytest.param({"nbf": int(time.time()) + 3600}, id="not-yet-valid"),
        pytest.param({"exp": int(time.time()) - 3600}, id="expired"),
    ],
)
async def test_a_token_signed_with_the_secret_must_also_say_the_right_things(
    gateway: Gateway, upstream: Upstream, claims: dict[str, Any]
) -> None:
    now = int(time.time())
    payload = {"sub": "u", "iss": ISSUER, "aud": "authenticated", "exp": now + 600, **claims}
    bearer = jwt.encode({k: v for k, v in payload.items() if v is not None}, SECRET, "HS256")
    before = len(upstream.telemetry.calls)
    r = await get_health(gateway, bearer)
    assert_json_error(r, 401, 16, "UNAUTHENTICATED")
    assert len(upstream.telemetry.calls) == before


async def test_the_right_issuer_and_audience_name_the_user(gateway: Gateway) -> None:
    seen = echoed(await get_health(gateway, token({"sub": "user-7"})))
    assert seen["x-genmesh-user-id"] == "user-7"


# -- keys from a JWKS --------------------------------------------------------------------------


async def test_jwks_file_tokens_are_accepted_and_others_refused(
    jwks_file_gateway: Gateway, keys: Keys
) -> None:
    for bearer in (
        signed(keys.rsa, "RS256", "rsa-1", sub="rsa-user"),
        signed(keys.ec, "ES256", "ec-1", sub="ec-user"),
    ):
        seen = echoed(await get_health(jwks_file_gateway, bearer))
        assert seen["x-genmesh-user-id"] in {"rsa-user", "ec-user"}
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for bearer in (
        signed(stranger, "RS256", "rsa-1", sub="u"),  # right kid, wrong key
        signed(keys.rsa, "RS256", "rsa-1", sub="u", iss="https://evil.example/auth/v1"),
        # Without a configured secret, an HS256 token verifies against nothing.
        token({"sub": "u"}),
    ):
        assert_json_error(await get_health(jwks_file_gateway, bearer), 401, 16, "UNAUTHENTICATED")
    # No token: a guest.
    assert "x-genmesh-user-id" not in echoed(await get_health(jwks_file_gateway))


async def test_jwks_url_is_fetched_once_and_cached_beside_the_secret(
    jwks_url_gateway: Gateway, jwks_server: JwksServer, keys: Keys
) -> None:
    for n in range(5):
        bearer = signed(keys.rsa, "RS256", "rsa-1", sub=f"remote-{n}")
        seen = echoed(await get_health(jwks_url_gateway, bearer))
        assert seen["x-genmesh-user-id"] == f"remote-{n}"
    # The shared secret still works alongside.
    assert echoed(await get_health(jwks_url_gateway, token({"sub": "hs"})))["x-genmesh-user-id"]
    assert 1 <= jwks_server.fetches <= 2  # fetched at start (and maybe on first use), cached
    stranger = ec.generate_private_key(ec.SECP256R1())
    r = await get_health(jwks_url_gateway, signed(stranger, "ES256", "ec-1", sub="u"))
    assert_json_error(r, 401, 16, "UNAUTHENTICATED")


# -- the role claim ----------------------------------------------------------------------------


async def test_the_role_claim_reaches_the_services_and_cannot_be_forged(gateway: Gateway) -> None:
    admin = token({"sub": "root", "app_metadata": {"role": "admin", "provider": "email"}})
    seen = echoed(await get_health(gateway, admin, **{"x-genmesh-user-role": "nobody"}))
    assert seen["x-genmesh-user-role"] == "admin"
    seen = echoed(await get_health(gateway, token({"sub": "plain", "role": "authenticated"})))
    assert "x-genmesh-user-role" not in seen
    # A forged role without a token is dropped.
    seen = echoed(await get_health(gateway, **{"x-genmesh-user-role": "admin"}))
    assert "x-genmesh-user-role" not in seen


# -- CORS --------------------------------------------------------------------------------------


async def test_preflight_from_an_allowed_origin_is_answered_by_envoy(
    jwks_file_gateway: Gateway, upstream: Upstream
) -> None:
    before = len(upstream.telemetry.calls)
    async with httpx.AsyncClient(base_url=jwks_file_gateway.url, timeout=20) as http:
        r = await http.options(
            "/api/generate",
            headers={
                "origin": ORIGIN,
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            },
        )
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert r.headers["access-control-allow-credentials"] == "true"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in allowed_headers(r)
    assert r.headers["access-control-max-age"] == "600"
    assert len(upstream.telemetry.calls) == before


def allowed_headers(response: httpx.Response) -> list[str]:
    return [h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")]


async def test_a_preflight_for_cache_control_is_allowed(jwks_file_gateway: Gateway) -> None:
    """A page asking generate for a fresh answer (Cache-Control: no-cache) preflights that
    header; the browser sends the request only if the answer lists it."""
    async with httpx.AsyncClient(base_url=jwks_file_gateway.url, timeout=20) as http:
        r = await http.options(
            "/api/generate",
            headers={
                "origin": ORIGIN,
                "access-control-request-method": "POST",
                "access-control-request-headers": "cache-control, content-type",
            },
        )
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert {"cache-control", "content-type"} <= set(allowed_headers(r))


async def test_an_origin_configured_in_another_case_matches_what_browsers_send(
    jwks_file_gateway: Gateway,
) -> None:
    """GATEWAY_CORS_ORIGINS says HTTP://LocalHost:5173; browsers send http://localhost:5173
    (scheme and host are case-insensitive, and serialised in lower case)."""
    browser = "http://localhost:5173"
    async with httpx.AsyncClient(base_url=jwks_file_gateway.url, timeout=20) as http:
        preflight = await http.options(
            "/api/generate",
            headers={"origin": browser, "access-control-request-method": "POST"},
        )
        simple = await http.get("/api/health", headers={"origin": browser})
    assert preflight.status_code == 200, preflight.text
    for r in (preflight, simple):
        assert r.headers["access-control-allow-origin"] == browser
        assert r.headers["access-control-allow-credentials"] == "true"


async def test_responses_vary_by_origin_when_origins_are_listed(
    jwks_file_gateway: Gateway, client: httpx.AsyncClient
) -> None:
    """Whether a response carries CORS headers, and which origin, depends on Origin: a shared
    cache must not hand one origin's answer to another. Envoy's cors filter says nothing about
    it; the gateway adds Vary: Origin to every response, the preflight's and errors included."""
    async with httpx.AsyncClient(base_url=jwks_file_gateway.url, timeout=20) as http:
        responses = {
            "preflight": await http.options(
                "/api/generate",
                headers={"origin": ORIGIN, "access-control-request-method": "POST"},
            ),
            "allowed": await http.get("/api/health", headers={"origin": ORIGIN}),
            "foreign": await http.get("/api/health", headers={"origin": "https://evil.example"}),
            "no origin": await http.get("/api/health"),
            "401": await http.get(
                "/api/health", headers={"origin": ORIGIN, "authorization": "Bearer garbage"}
            ),
            "404": await http.get("/api/nope", headers={"origin": ORIGIN}),
        }
    for name, r in responses.items():
        assert r.headers.get_list("vary") == ["Origin"], (name, r.status_code, r.headers)
    # Without origins nothing depends on Origin (same-origin only): no Vary.
    r = await client.get("/api/health", headers={"origin": ORIGIN})
    assert r.status_code == 200
    assert "vary" not in r.headers


async def test_a_foreign_origin_gets_no_cors_headers(jwks_file_gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=jwks_file_gateway.url, timeout=20) as http:
        preflight = await http.options(
            "/api/generate",
            headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        )
        simple = await http.get("/api/health", headers={"origin": "https://evil.example"})
    for r in (preflight, simple):
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-credentials" not in r.headers
        assert r.status_code < 500


async def test_cors_headers_reach_successes_and_errors_alike(jwks_file_gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=jwks_file_gateway.url, timeout=20) as http:
        ok = await http.get("/api/health", headers={"origin": ORIGIN})
        refused = await http.get(
            "/api/health", headers={"origin": ORIGIN, "authorization": "Bearer garbage"}
        )
    assert ok.status_code == 200
    assert refused.status_code == 401
    for r in (ok, refused):
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert r.headers["access-control-allow-credentials"] == "true"
        assert "retry-after" in r.headers["access-control-expose-headers"]


async def test_without_origins_the_api_is_same_origin_only(client: httpx.AsyncClient) -> None:
    r = await client.options(
        "/api/generate", headers={"origin": ORIGIN, "access-control-request-method": "POST"}
    )
    assert "access-control-allow-origin" not in r.headers


# -- header limits -----------------------------------------------------------------------------


async def test_oversized_headers_are_refused(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/health", headers={"x-padding": "a" * (40 * 1024)})
    assert r.status_code == 431
    many = {f"x-h{i}": "v" for i in range(120)}
    r = await client.get("/api/health", headers=many)
    assert r.status_code == 431


# -- the admin credential, as the rate limit service sees it -----------------------------------


async def test_admin_paths_carry_the_credential_to_the_rate_limit_service(
    limited_gateway: Gateway, upstream: Upstream
) -> None:
    admin = token({"sub": "root", "app_metadata": {"role": "admin"}})
    async with httpx.AsyncClient(base_url=limited_gateway.url, timeout=20) as http:
        await http.get("/api/admin/blocks", headers={"x-admin-token": "guess"})
        assert upstream.ratelimit.calls[-1][1] == {
            "admin_auth": "check",
            "path": "/api/admin/blocks",
            "remote_address": "127.0.0.1",
            "admin_token": "guess",
        }
        await http.get("/api/admin/health", headers={"authorization": f"Bearer {admin}"})
        descriptors = upstream.ratelimit.calls[-1]
        assert descriptors[2] == {
            "admin_auth": "check",
            "path": "/api/admin/health",
            "remote_address": "127.0.0.1",
            "user": "root",
            "role": "admin",
        }
        await http.get("/api/admin/cache")
        assert upstream.ratelimit.calls[-1][1] == {
            "admin_auth": "check",
            "path": "/api/admin/cache",
            "remote_address": "127.0.0.1",
        }
        # Public paths send no admin descriptor, even with an admin token.
        await http.get("/api/health", headers={"x-admin-token": "guess"})
        assert all("admin_auth" not in d for d in upstream.ratelimit.calls[-1])


# -- Envoy's admin API and the ops listener ----------------------------------------------------


async def test_over_its_heap_budget_envoy_sheds_new_requests_with_json_503(
    upstream: Upstream, tmp_path: Path, descriptor_set: Path
) -> None:
    """The overload manager's stop_accepting_requests action, made to fire: a heap budget
    (1 MiB) below what Envoy uses at rest, which no setting allows."""

    def tiny_heap(config: dict[str, Any]) -> None:
        (heap,) = [
            m
            for m in config["overload_manager"]["resource_monitors"]
            if m["name"] == "envoy.resource_monitors.fixed_heap"
        ]
        heap["typed_config"]["max_heap_size_bytes"] = 1024 * 1024

    running, process = await start_gateway(
        tmp_path, upstream.port, SECRET, MAX_BYTES, edit=tiny_heap
    )
    try:
        # The overload manager samples the heap every 250 ms: its first verdict may follow
        # the first requests.
        deadline = time.monotonic() + 10
        while (r := await get_health(running)).status_code != 503:
            assert time.monotonic() < deadline, "never shed"
            await asyncio.sleep(0.1)
        before = len(upstream.telemetry.calls)
        r = await get_health(running)
        assert_json_error(r, 503, 14, "UPSTREAM_UNAVAILABLE")
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["retry-after"] == "1"
        assert len(upstream.telemetry.calls) == before
    finally:
        stop(process)


def rendered(gateway: Gateway) -> dict[str, Any]:
    return load((gateway.log.parent / "envoy.yaml").read_text())


async def test_the_ops_listener_serves_only_prometheus_stats_and_readiness(
    gateway: Gateway,
) -> None:
    ops_port = ops_listener(rendered(gateway))["address"]["socket_address"]["port_value"]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ops_port}", timeout=10) as ops:
        stats = await ops.get("/stats/prometheus")
        assert stats.status_code == 200
        assert "envoy_cluster_upstream_rq" in stats.text
        # The overload manager watches the heap (GATEWAY_MAX_HEAP_BYTES) and is not shedding.
        pressure = [
            line
            for line in stats.text.splitlines()
            if line.startswith("envoy_overload_envoy_resource_monitors_fixed_heap_pressure")
        ]
        assert len(pressure) == 1, pressure
        assert 0 <= float(pressure[0].split()[-1]) < 90
        assert "envoy_overload_envoy_overload_actions_stop_accepting_requests_active{} 0" in (
            stats.text
        )
        ready = await ops.get("/ready")
        assert (ready.status_code, ready.text.strip()) == (200, "LIVE")
        for method, path in [
            ("GET", "/config_dump"),
            ("GET", "/stats"),
            ("GET", "/clusters"),
            ("POST", "/quitquitquit"),
            ("POST", "/healthcheck/fail"),
            ("POST", "/stats/prometheus"),
            ("GET", "/stats/prometheus/../config_dump"),
        ]:
            r = await ops.request(method, path)
            assert r.status_code == 404, (method, path, r.status_code)
    # Envoy is still up and serving: nothing above reached the admin API.
    assert (await get_health(gateway)).status_code == 200


def test_the_admin_api_listens_on_loopback_only(gateway: Gateway) -> None:
    admin = rendered(gateway)["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1"
    # From another address of this host, nothing answers on the admin port.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a source address
        own_address = probe.getsockname()[0]
    if ipaddress.ip_address(own_address).is_loopback:
        return  # a host with no other address: the loopback binding above is the whole story
    with socket.socket() as sock:
        sock.settimeout(2)
        assert sock.connect_ex((own_address, admin["port_value"])) != 0
