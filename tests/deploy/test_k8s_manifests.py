"""The Kubernetes manifests in deploy/k8s: every kustomize target renders, validates against the
bundled Kubernetes schemas (strict, offline), and has the properties that matter: hardened pods,
gRPC probes on the right ports, termination budgets, no committed secrets, and network policies
that allow exactly the data flow. Uses the same functions as `deploy/k8s/validate.py`."""

from __future__ import annotations

import base64
import copy
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from devstack.infra import free_port
from services.gateway.settings import GatewaySettings
from services.generation.inflight import INFLIGHT
from services.telemetry.settings import TelemetrySettings
from tests.deploy.netpol import Connection, Endpoint, PolicySet, workload_endpoints

REPO = Path(__file__).resolve().parents[2]
VALIDATE_PY = REPO / "deploy" / "k8s" / "validate.py"


def _load_validate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("genmesh_k8s_validate", VALIDATE_PY)
    assert spec is not None and spec.loader is not None, f"cannot load {VALIDATE_PY}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


validate = _load_validate()
TARGETS = {t.name: t for t in validate.TARGETS}
SERVICES = {s.name: s for s in validate.GRPC_SERVICES}
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def kubectl() -> str:
    """Never skip: without kubectl nothing here would be checked."""
    try:
        binary: str = validate.kubectl_binary()
    except validate.KubectlNotFoundError as err:
        pytest.fail(str(err))
    return binary


@pytest.fixture(scope="module")
def rendered(kubectl: str) -> dict[str, list[Obj]]:
    return {name: validate.render(target) for name, target in TARGETS.items()}


def pod_specs(objects: list[Obj]) -> list[tuple[Obj, Obj]]:
    return [(o, s) for o in objects if (s := validate.pod_spec(o)) is not None]


def deployments(objects: list[Obj]) -> list[Obj]:
    return [o for o in objects if o["kind"] == "Deployment"]


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    found = validate.find(objects, kind, name)
    assert found is not None, f"{kind}/{name} not rendered"
    result: Obj = found
    return result


# --- rendering and schemas --------------------------------------------------------------------


@pytest.mark.parametrize("target", list(TARGETS))
def test_target_renders_and_validates_strictly(rendered, target):
    objects = rendered[target]
    assert objects, f"{target} rendered nothing"
    for version in validate.schema_versions():
        assert validate.schema_errors(objects, version) == [], f"{target} against {version}"


@pytest.mark.parametrize("target", list(TARGETS))
def test_target_follows_project_rules(rendered, target):
    assert validate.policy_errors(rendered[target], TARGETS[target]) == []


def test_schema_versions_include_1_33_and_the_newest_bundled():
    versions = validate.schema_versions()
    assert versions[0] == "1.33.0"
    assert versions[-1] == validate.kv.latest_version()


def test_schema_validation_is_not_vacuous(rendered):
    """A misspelt field and a wrong type are caught, and an unknown kind is an error."""
    misspelt = copy.deepcopy(find(rendered["base"], "Deployment", "quota"))
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 1
    wrong_type = copy.deepcopy(find(rendered["base"], "Deployment", "quota"))
    wrong_type["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] = "1Gi"
    errors = validate.schema_errors([misspelt, wrong_type], "1.33.0")
    assert len(errors) == 2, errors
    assert "readinessProbe.grpc" in errors[0] and "'prot' was unexpected" in errors[0]
    assert "resources.limits" in errors[1]
    unknown = {"apiVersion": "example.com/v1", "kind": "Gizmo", "metadata": {"name": "x"}}
    assert validate.schema_errors([unknown], "1.33.0")


# --- pods --------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_pod_is_hardened(rendered, target):
    workloads = pod_specs(rendered[target])
    assert workloads
    for obj, spec in workloads:
        name = f"{target} {obj['kind']}/{obj['metadata']['name']}"
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["serviceAccountName"] == obj["metadata"]["name"], name
        assert (
            find(rendered[target], "ServiceAccount", spec["serviceAccountName"])[
                "automountServiceAccountToken"
            ]
            is False
        )
        assert spec["enableServiceLinks"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["runAsNonRoot"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), name
            if container["image"].startswith("genmesh/"):
                assert sc["runAsUser"] == 10001, name
                assert spec["securityContext"]["runAsUser"] == 10001, name
                tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
                volume = next(v for v in spec["volumes"] if v["name"] == tmp["name"])
                assert "sizeLimit" in volume["emptyDir"], name


@pytest.mark.parametrize("target", list(TARGETS))
def test_deployments_are_labelled_spread_and_roll_without_loss(rendered, target):
    for deployment in deployments(rendered[target]):
        name = deployment["metadata"]["name"]
        template = deployment["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == name
        assert labels["app.kubernetes.io/part-of"] == "genmesh"
        assert labels["app.kubernetes.io/component"]
        # Selectors are immutable: only the name, never part-of.
        assert deployment["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/name": name}}
        if name in SERVICES or name == "gateway":
            assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
            keys = {c["topologyKey"] for c in template["spec"]["topologySpreadConstraints"]}
            assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("service", list(SERVICES))
def test_grpc_service_probes_ports_and_shutdown(rendered, target, service):
    objects = rendered[target]
    expected = SERVICES[service]
    deployment = find(objects, "Deployment", service)
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "grpc": expected.grpc_port,
        "metrics": expected.metrics_port,
    }
    # Readiness follows the dependencies (the overall status); startup and liveness follow
    # the process (the `liveness` health name), so an outage never restarts pods.
    assert container["readinessProbe"]["grpc"] == {"port": expected.grpc_port}
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": expected.grpc_port, "service": "liveness"}
    settings = validate.config_map_values(objects, container)
    assert settings["GRPC_HOST"] == "0.0.0.0"
    assert settings["GRPC_PORT"] == str(expected.grpc_port)
    assert settings["METRICS_PORT"] == str(expected.metrics_port)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = float(settings["SHUTDOWN_GRACE_SECONDS"])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + grace + 5
    if service == "generation":
        # A call that started just before SIGTERM may run its whole deadline (60 s, streams
        # included): the drain lets it.
        assert grace >= validate.longest_deadline(objects) == 60
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(expected.metrics_port)
    # Headless, one gRPC port with the h2c app protocol.
    svc = find(objects, "Service", service)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["ports"] == [
        {
            "name": "grpc",
            "port": expected.grpc_port,
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": "kubernetes.io/h2c",
        }
    ]


def _secret_refs(container: Obj) -> dict[str, str]:
    """env name -> genmesh-secrets key, for every secretKeyRef of a container."""
    refs = {}
    for env in container.get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"].startswith("genmesh-secrets")  # dev: with its content hash
            refs[env["name"]] = ref["key"]
    return refs


def test_services_get_exactly_the_secret_keys_they_need(rendered):
    objects = rendered["base"]

    def secret_keys(kind: str, name: str) -> set[str]:
        (container,) = validate.pod_spec(find(objects, kind, name))["containers"]
        refs = _secret_refs(container)
        assert all(env == key for env, key in refs.items()), refs
        return set(refs)

    assert secret_keys("Deployment", "generation") == {
        "REDIS_URL",
        "OPENAI_API_KEY",
        "GENMESH_ADMIN_TOKEN",
    }
    assert secret_keys("Deployment", "quota") == {
        "DATABASE_URL",
        "REDIS_URL",
        "GENMESH_ADMIN_TOKEN",
    }
    assert secret_keys("Deployment", "telemetry") == {
        "DATABASE_URL",
        "REDIS_URL",
        "GENMESH_ADMIN_TOKEN",
    }
    assert secret_keys("Deployment", "gateway") == {"SUPABASE_JWT_SECRET"}
    # The migrator's credentials: the partition maintenance and the migrations only.
    (retention,) = validate.pod_spec(find(objects, "CronJob", "events-retention"))["containers"]
    assert _secret_refs(retention) == {"DATABASE_URL": "MIGRATE_DATABASE_URL"}


def test_service_addresses_and_settings(rendered):
    objects = rendered["base"]

    def settings(name: str) -> dict[str, str]:
        (container,) = find(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        values: dict[str, str] = validate.config_map_values(objects, container)
        return values

    generation = settings("generation")
    assert generation["QUOTA_ADDR"] == "quota:50052"
    assert generation["TELEMETRY_ADDR"] == "telemetry:50053"
    assert "OPENAI_BASE_URL" in generation  # empty: OpenAI's own API
    for key in ("OPENAI_TEXT_MODEL", "OPENAI_VISION_MODEL"):
        assert generation[key]
    assert int(generation["GEN_CACHE_TTL_SECONDS"]) > 0
    assert int(generation["GEN_MAX_INFLIGHT"]) > 0
    quota = settings("quota")
    assert quota["QUOTA_TIMEZONE"] == "UTC"
    for key in ("GUEST_DAILY_LIMIT", "FREE_DAILY_LIMIT", "PRO_DAILY_LIMIT"):
        assert int(quota[key]) >= 0
    telemetry = settings("telemetry")
    assert telemetry["GENERATION_ADDR"] == "generation:50051"
    assert telemetry["QUOTA_ADDR"] == "quota:50052"
    assert telemetry["HEALTH_CACHE_SECONDS"] == "1"
    assert telemetry["EDGE_EVENT_WINDOW_SECONDS"] == "60"
    assert telemetry["EDGE_EVENT_THRESHOLD"] == "20"
    assert telemetry["EDGE_EVENT_MAX_TRACKED"] == "100000"
    for name in SERVICES:
        assert settings(name)["REDIS_KEY_PREFIX"]
        assert settings(name)["LOG_LEVEL"] == "INFO"
    gateway = settings("gateway")
    assert gateway["GENERATION_ADDR"] == "generation:50051"
    assert gateway["QUOTA_ADDR"] == "quota:50052"
    assert gateway["TELEMETRY_ADDR"] == "telemetry:50053"
    assert gateway["GATEWAY_LISTEN_HOST"] == "0.0.0.0"  # the public and the ops listener
    # The admin API is loopback-only: its address is no longer a setting.
    assert "GATEWAY_ADMIN_HOST" not in gateway
    assert gateway["GATEWAY_OPS_PORT"] == "9902"
    assert gateway["GATEWAY_TRUSTED_PROXY_HOPS"] == "1"
    assert gateway["SUPABASE_URL"] == ""  # each overlay sets it
    assert gateway["GATEWAY_JWT_AUDIENCE"] == "authenticated"
    assert gateway["GATEWAY_ADMIN_ROLE_CLAIM"] == "app_metadata.role"
    assert gateway["GATEWAY_JWKS_URL"] == gateway["GATEWAY_JWKS_FILE"] == ""
    assert gateway["GATEWAY_MAX_BODY_BYTES"] == str(64 * 1024)
    assert gateway["GATEWAY_MAX_REQUEST_BYTES"] == str(8 * 1024 * 1024)
    assert gateway["GATEWAY_MAX_HEAP_BYTES"] == str(384 * 1024 * 1024)
    assert gateway["GATEWAY_CORS_ORIGINS"] == ""


def test_gateway_exposes_only_the_public_port(rendered):
    for target in TARGETS:
        objects = rendered[target]
        svc = find(objects, "Service", "gateway")
        assert [p["port"] for p in svc["spec"]["ports"]] == [80]
        assert svc["spec"]["ports"][0]["targetPort"] == "http"
        deployment = find(objects, "Deployment", "gateway")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        # Probes and Prometheus use the ops listener (/ready and /stats/prometheus only).
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
            "http": 8080,
            "ops": 9902,
        }
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["httpGet"] == {"path": "/ready", "port": 9902}, probe
        assert container["livenessProbe"]["tcpSocket"] == {"port": 8080}
        assert (
            "/drain_listeners?graceful" in container["lifecycle"]["preStop"]["exec"]["command"][2]
        )
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == "9902"
        assert annotations["prometheus.io/path"] == "/stats/prometheus"
    # The L4 load balancer variant trusts no X-Forwarded-For and keeps client addresses.
    objects = rendered["all-components"]
    svc = find(objects, "Service", "gateway")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    (container,) = find(objects, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    assert validate.config_map_values(objects, container)["GATEWAY_TRUSTED_PROXY_HOPS"] == "0"


def test_envoy_admin_port_is_never_exposed(rendered):
    """Envoy's admin API (9901) can stop Envoy and dump its config, the JWT secret included:
    it listens on loopback only, so nothing may point at it from outside the pod."""
    for target, objects in rendered.items():
        for obj, spec in pod_specs(objects):
            for container in spec["containers"]:
                exposed = [p for p in container.get("ports", []) if p["containerPort"] == 9901]
                assert exposed == [], f"{target} {validate.describe(obj)} exposes 9901"
        for svc in (o for o in objects if o["kind"] == "Service"):
            for port in svc["spec"]["ports"]:
                assert 9901 not in (port["port"], port.get("targetPort")), target
        for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
            for rule in policy["spec"].get("ingress", []):
                assert 9901 not in [p.get("port") for p in rule.get("ports", [])], target
        (container,) = find(objects, "Deployment", "gateway")["spec"]["template"]["spec"][
            "containers"
        ]
        settings = validate.config_map_values(objects, container)
        assert "GATEWAY_ADMIN_HOST" not in settings, target
        assert settings.get("GATEWAY_ADMIN_PORT", "9901") == "9901", target


def test_gateway_identity_settings_per_overlay(rendered):
    def gateway(target: str) -> dict[str, str]:
        objects = rendered[target]
        (container,) = find(objects, "Deployment", "gateway")["spec"]["template"]["spec"][
            "containers"
        ]
        values: dict[str, str] = validate.config_map_values(objects, container)
        return values

    # Dev: the Supabase CLI's local project (its tokens carry iss .../auth/v1).
    assert gateway("overlays/dev")["SUPABASE_URL"] == "http://127.0.0.1:54321"
    # Prod: a placeholder to replace, like the Ingress host and the egress CIDRs.
    prod = gateway("overlays/prod")
    assert prod["SUPABASE_URL"] == "https://REPLACE_ME.supabase.co"
    assert prod["GATEWAY_CORS_ORIGINS"] == ""
    assert prod["GATEWAY_HSTS"] == "true"


def _gateway_settings(objects: list[Obj], secret: dict[str, str]) -> GatewaySettings:
    """The gateway's own settings model on a rendered ConfigMap plus the Secret's keys."""
    (container,) = find(objects, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    values = validate.config_map_values(objects, container)
    known = {f.alias for f in GatewaySettings.model_fields.values()}
    assert set(values) - known == set(), "gateway-config has keys the gateway does not read"
    env = {**values, **{k: secret[k] for k in validate.secret_keys(container)}}
    return GatewaySettings(**env)


def test_overlay_gateway_config_is_accepted_by_the_gateway(rendered, monkeypatch):
    """The rendered settings pass services/gateway/settings.py (the source of truth): a
    missing issuer, a stale key or an out-of-range size fails here, not at the pod's start."""
    for name in list(os.environ):
        if name.startswith(("GATEWAY_", "SUPABASE_")):
            monkeypatch.delenv(name)
    dev = rendered["overlays/dev"]
    (secret,) = [o for o in dev if o["kind"] == "Secret"]
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    settings = _gateway_settings(dev, values)
    assert settings.issuer == "http://127.0.0.1:54321/auth/v1"
    assert settings.audiences == ["authenticated"]
    assert (settings.port, settings.ops_port, settings.admin_port) == (8080, 9902, 9901)
    assert settings.max_body_bytes == 64 * 1024
    assert settings.max_request_bytes == 8 * 1024 * 1024
    (container,) = find(dev, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    limit = validate.memory_bytes(container["resources"]["limits"]["memory"])
    assert settings.max_heap_bytes < limit
    # Prod's Secret is created out of band with the keys of secret.example.env.
    example = REPO / "deploy" / "k8s" / "secret.example.env"
    keys = dict(
        line.split("=", 1)
        for line in example.read_text().splitlines()
        if line and not line.startswith("#")
    )
    prod = _gateway_settings(rendered["overlays/prod"], keys)
    assert prod.issuer == "https://REPLACE_ME.supabase.co/auth/v1"
    assert prod.hsts is True
    assert prod.origins == []


def test_telemetry_config_is_read_by_the_telemetry_service(rendered, monkeypatch):
    """Every key of telemetry-config is a telemetry setting, and the service accepts them all."""
    objects = rendered["base"]
    (container,) = find(objects, "Deployment", "telemetry")["spec"]["template"]["spec"][
        "containers"
    ]
    values = validate.config_map_values(objects, container)
    known = {(f.alias or name).upper() for name, f in TelemetrySettings.model_fields.items()}
    assert set(values) - known == set(), "telemetry-config has keys telemetry does not read"
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    settings = TelemetrySettings()
    defaults = TelemetrySettings.model_fields
    for field in (
        "edge_event_window_seconds",
        "edge_event_threshold",
        "edge_event_max_tracked",
        "health_cache_seconds",
    ):
        # The documented defaults, written out so operators see them.
        assert getattr(settings, field) == defaults[field].default, field
    assert settings.grpc_port == SERVICES["telemetry"].grpc_port


@pytest.mark.parametrize("target", list(TARGETS))
def test_migrations_run_before_the_services_with_the_migrators_credentials(rendered, target):
    """An init container of every Deployment that uses PostgreSQL (quota, telemetry) runs the
    migrations from the service's own image as the migrator role; the service itself connects
    with DATABASE_URL, a role with data rights only. No Job to order: a pod never starts on a
    schema older than its code, and the advisory lock makes concurrent pods safe."""
    objects = rendered[target]
    assert validate.find(objects, "Job", "migrate") is None
    for deployment in deployments(objects):
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        name = deployment["metadata"]["name"]
        inits = spec.get("initContainers", [])
        if name not in {"quota", "telemetry"}:
            assert not [c for c in inits if c["name"] == "migrate"], name
            assert "DATABASE_URL" not in _secret_refs(container), name
            continue
        (migrate,) = inits
        assert migrate["name"] == "migrate"
        assert migrate["command"] == ["python3", "-m", "services.common.migrations"]
        assert migrate["image"] == container["image"]
        assert _secret_refs(migrate) == {"DATABASE_URL": "MIGRATE_DATABASE_URL"}
        assert _secret_refs(container)["DATABASE_URL"] == "DATABASE_URL"
        assert "MIGRATE_DATABASE_URL" not in _secret_refs(container).values()
    # Partition maintenance (DDL) with the migrator's role; telemetry's in-process backstop
    # trails it by a month ahead and a day of retention, so it never needs DDL itself.
    cronjob = find(objects, "CronJob", "events-retention")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    (job,) = validate.pod_spec(cronjob)["containers"]
    assert job["command"] == ["python3", "-m", "services.telemetry.retention"]
    telemetry = find(objects, "Deployment", "telemetry")["spec"]["template"]["spec"]
    assert job["image"] == telemetry["containers"][0]["image"]
    job_env = {e["name"]: e["value"] for e in job["env"] if "value" in e}
    settings = validate.config_map_values(objects, telemetry["containers"][0])
    assert int(settings["EVENTS_RETENTION_DAYS"]) == int(job_env["EVENTS_RETENTION_DAYS"]) + 1
    assert int(settings["EVENTS_PARTITIONS_AHEAD"]) == int(job_env["EVENTS_PARTITIONS_AHEAD"]) - 1


def test_migration_rules_catch_regressions(rendered):
    objects = copy.deepcopy(rendered["base"])
    quota = find(objects, "Deployment", "quota")["spec"]["template"]["spec"]
    quota["initContainers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["key"] = "DATABASE_URL"
    telemetry = find(objects, "Deployment", "telemetry")["spec"]["template"]["spec"]
    del telemetry["initContainers"]
    telemetry["containers"][0]["env"].append(
        {
            "name": "MIGRATE_DATABASE_URL",
            "valueFrom": {
                "secretKeyRef": {"name": "genmesh-secrets", "key": "MIGRATE_DATABASE_URL"}
            },
        }
    )
    objects.remove(find(objects, "CronJob", "events-retention"))
    errors = "\n".join(validate.migration_errors(objects))
    assert "Deployment/quota: the migrate init container reads DATABASE_URL from" in errors
    assert "Deployment/telemetry: reads DATABASE_URL, so needs a `migrate` init" in errors
    assert "container telemetry: MIGRATE_DATABASE_URL (the schema owner)" in errors
    assert "CronJob/events-retention is missing" in errors


def test_overlays_choose_images_replicas_and_components(rendered):
    dev, prod = rendered["overlays/dev"], rendered["overlays/prod"]
    for deployment in deployments(dev):
        if deployment["metadata"]["name"] in {*SERVICES, "gateway"}:
            assert deployment["spec"]["replicas"] == 1
            assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":dev")
    assert find(dev, "StatefulSet", "postgres")
    assert find(dev, "Deployment", "redis")
    assert not [o for o in dev if o["kind"] == "HorizontalPodAutoscaler"]
    assert not [o for o in prod if o["kind"] in {"StatefulSet", "Secret"}]
    assert validate.find(prod, "Deployment", "redis") is None
    for name in (*SERVICES, "gateway"):
        assert "replicas" not in find(prod, "Deployment", name)["spec"]  # the HPA owns it
        hpa = find(prod, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["minReplicas"] >= 2
        pdb = find(prod, "PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}
    # otel: the endpoint reaches exactly the three gRPC services.
    config = next(o for o in prod if o["metadata"]["name"].startswith("otel-config"))
    assert config["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://")
    for deployment in deployments(prod):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        settings = validate.config_map_values(prod, container)
        has_otel = "OTEL_EXPORTER_OTLP_ENDPOINT" in settings
        assert has_otel == (deployment["metadata"]["name"] in SERVICES)


# --- secrets -----------------------------------------------------------------------------------


def test_no_secret_in_base_or_prod(rendered):
    for target in ("base", "overlays/prod"):
        assert not [o for o in rendered[target] if o["kind"] == "Secret"], target


def test_dev_secret_is_generated_with_obviously_fake_values(rendered):
    (secret,) = [o for o in rendered["overlays/dev"] if o["kind"] == "Secret"]
    assert secret["metadata"]["name"].startswith("genmesh-secrets-")  # hashed, rolls pods
    assert set(secret["data"]) == {
        "DATABASE_URL",
        "MIGRATE_DATABASE_URL",
        "REDIS_URL",
        "OPENAI_API_KEY",
        "SUPABASE_JWT_SECRET",
        "GENMESH_ADMIN_TOKEN",
        "POSTGRES_PASSWORD",
        "POSTGRES_APP_PASSWORD",
        "REDIS_PASSWORD",
    }
    assert validate.secret_errors([secret], fake_allowed=True) == []
    # Every reference follows the generated name.
    for _obj, spec in pod_specs(rendered["overlays/dev"]):
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == secret["metadata"]["name"]


def test_rules_catch_regressions(rendered):
    """The checks the Makefile target relies on fail on the mistakes they are for."""
    objects = copy.deepcopy(rendered["base"])
    quota = find(objects, "Deployment", "quota")
    container = quota["spec"]["template"]["spec"]["containers"][0]
    del container["securityContext"]["readOnlyRootFilesystem"]
    container["livenessProbe"] = {"grpc": {"port": 50051}}
    quota["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 10
    container["env"].append({"name": "OPENAI_API_KEY", "value": "sk-live-0123456789"})
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "leak", "namespace": "genmesh"},
            "stringData": {"OPENAI_API_KEY": "sk-live-0123456789"},
        }
    )
    errors = "\n".join(validate.policy_errors(objects, TARGETS["base"]))
    assert "readOnlyRootFilesystem" in errors
    assert "livenessProbe must be a grpc probe on port 50052" in errors
    assert "terminationGracePeriodSeconds 10" in errors
    assert "OPENAI_API_KEY must come from a Secret" in errors
    assert "Secret/leak: no Secret may be rendered here" in errors
    fake_check = validate.secret_errors(objects[-1:], fake_allowed=True)
    assert fake_check == ["Secret/leak: OPENAI_API_KEY does not look obviously fake"]


def test_rules_catch_gateway_regressions(rendered):
    """Re-exposing Envoy's admin API, probing it, dropping the issuer or a heap budget above
    the memory limit: each is a rule error."""
    objects = copy.deepcopy(rendered["overlays/dev"])
    gateway = find(objects, "Deployment", "gateway")
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    container["ports"].append({"name": "admin", "containerPort": 9901, "protocol": "TCP"})
    container["readinessProbe"]["httpGet"]["port"] = 9901
    gateway["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = "9901"
    container["resources"]["limits"]["memory"] = "256Mi"
    config = next(o for o in objects if o["metadata"]["name"].startswith("gateway-config"))
    config["data"]["GATEWAY_ADMIN_HOST"] = "0.0.0.0"
    config["data"]["SUPABASE_URL"] = ""
    errors = "\n".join(validate.policy_errors(objects, TARGETS["overlays/dev"]))
    assert "the admin port 9901 must not be a containerPort" in errors
    assert "GATEWAY_ADMIN_HOST is gone" in errors
    assert "readinessProbe must be GET /ready on the ops port 9902" in errors
    assert "Prometheus scrapes the ops port 9902" in errors
    assert "SUPABASE_URL (or GATEWAY_JWT_ISSUER) must be set" in errors
    assert "GATEWAY_MAX_HEAP_BYTES 402653184 must stay below" in errors
    # The issuer, not the project URL; building blocks (base) may leave it to the overlays.
    config["data"]["SUPABASE_URL"] = "https://x.supabase.co/auth/v1"
    errors = "\n".join(validate.policy_errors(objects, TARGETS["overlays/dev"]))
    assert "SUPABASE_URL must be the project URL" in errors
    assert validate.policy_errors(rendered["base"], TARGETS["base"]) == []
    assert validate.memory_bytes("512Mi") == 512 * 2**20
    assert validate.memory_bytes("1G") == 10**9
    assert validate.memory_bytes("lots") is None


def test_private_overlay_can_merge_real_credentials_into_dev(kubectl, tmp_path):
    """The README's recipe for real credentials in dev: an overlay outside the repository."""
    dev = REPO / "deploy" / "k8s" / "overlays" / "dev"
    (tmp_path / "real.env").write_text("OPENAI_API_KEY=sk-from-a-private-file\n")
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"resources: [{Path(*['..'] * len(tmp_path.parts[1:]), *dev.parts[1:])}]\n"
        "secretGenerator:\n"
        "  - name: genmesh-secrets\n"
        "    behavior: merge\n"
        "    envs: [real.env]\n"
    )
    objects = validate.kustomize(tmp_path)
    (secret,) = [o for o in objects if o["kind"] == "Secret"]
    assert base64.b64decode(secret["data"]["OPENAI_API_KEY"]) == b"sk-from-a-private-file"
    assert base64.b64decode(secret["data"]["GENMESH_ADMIN_TOKEN"]) == b"dev-fake-admin-token"


# --- network policies ----------------------------------------------------------------------------

NS_LABELS = {"kubernetes.io/metadata.name": "genmesh"}
MONITORING = Endpoint(
    "prometheus",
    "10.244.9.1",
    "monitoring",
    {"app.kubernetes.io/name": "prometheus"},
    {"kubernetes.io/metadata.name": "monitoring"},
)
GRAFANA = Endpoint(
    "grafana",
    "10.244.9.6",
    "monitoring",
    {"app.kubernetes.io/name": "grafana"},
    {"kubernetes.io/metadata.name": "monitoring"},
)
KUBE_DNS = Endpoint(
    "kube-dns",
    "10.244.9.2",
    "kube-system",
    {"k8s-app": "kube-dns"},
    {"kubernetes.io/metadata.name": "kube-system"},
    listens=((53, "UDP"), (53, "TCP")),
)
COLLECTOR = Endpoint(
    "otel-collector",
    "10.244.9.3",
    "observability",
    {"app.kubernetes.io/name": "otel-collector"},
    {"kubernetes.io/metadata.name": "observability"},
    listens=((4317, "TCP"), (4318, "TCP")),
)
OTHER_NAMESPACE_POD = Endpoint(
    "other-app",
    "10.244.9.4",
    "other",
    {"app.kubernetes.io/name": "generation"},  # same labels, wrong namespace
    {"kubernetes.io/metadata.name": "other"},
    listens=((8080, "TCP"),),
)
STRANGER = Endpoint(
    "stranger",
    "10.244.9.5",
    "genmesh",
    {"run": "debug-shell"},
    NS_LABELS,
    listens=((8080, "TCP"),),
)
INTERNET = Endpoint("internet", "203.0.113.10", listens=((443, "TCP"), (80, "TCP")))
INTERNET_V6 = Endpoint("internet-v6", "2001:db8::10", listens=((443, "TCP"),))
METADATA = Endpoint("cloud-metadata", "169.254.169.254", listens=((80, "TCP"), (443, "TCP")))
VPC_HOST = Endpoint("vpc-host", "192.168.5.5", listens=((443, "TCP"), (5432, "TCP")))
MANAGED_POSTGRES = Endpoint("managed-postgres", "10.10.0.5", listens=((5432, "TCP"),))
MANAGED_REDIS = Endpoint("managed-redis", "10.10.1.5", listens=((6379, "TCP"), (6380, "TCP")))
OUTSIDE = [
    MONITORING,
    GRAFANA,
    KUBE_DNS,
    COLLECTOR,
    OTHER_NAMESPACE_POD,
    INTERNET,
    INTERNET_V6,
    METADATA,
    VPC_HOST,
    MANAGED_POSTGRES,
    MANAGED_REDIS,
]


def expected_flows(datastores: str) -> set[Connection]:
    """The data flow, and nothing else."""
    c = Connection
    flows = {
        c("gateway", "generation", 50051),
        c("gateway", "quota", 50052),
        c("gateway", "telemetry", 50053),
        c("generation", "quota", 50052),
        c("generation", "telemetry", 50053),
        c("quota", "telemetry", 50053),
        c("generation", "internet", 443),
        c("generation", "internet-v6", 443),
        c("telemetry", "generation", 50051),
        c("telemetry", "quota", 50052),
        c("prometheus", "gateway", 9902),
    }
    # Metrics ports: the monitoring namespace; Envoy's ops port (/stats/prometheus, /ready):
    # only Prometheus itself. Envoy's admin API (9901) is on loopback: nobody.
    flows |= {
        c(scraper, name, port)
        for scraper in ("prometheus", "grafana")
        for name, port in (("generation", 9101), ("quota", 9102), ("telemetry", 9103))
    }
    # The public listener is open to everything outside the namespace's own (deny-all) pods.
    flows |= {c(o.name, "gateway", 8080) for o in OUTSIDE}
    pods = ["gateway", "generation", "quota", "telemetry", "events-retention", "stranger"]
    if datastores == "in-cluster":
        pods += ["postgres", "redis"]
        flows |= {c(s, "postgres", 5432) for s in ("quota", "telemetry", "events-retention")}
        flows |= {c(s, "redis", 6379) for s in ("generation", "quota", "telemetry")}
    else:
        flows |= {
            c(s, "managed-postgres", 5432) for s in ("quota", "telemetry", "events-retention")
        }
        flows |= {
            c(s, "managed-redis", p)
            for s in ("generation", "quota", "telemetry")
            for p in (6379, 6380)
        }
    flows |= {c(p, "kube-dns", 53, proto) for p in pods for proto in ("UDP", "TCP")}
    flows |= {c(s, "otel-collector", p) for s in SERVICES for p in (4317, 4318)}
    return flows


@pytest.mark.parametrize(
    ("target", "datastores"),
    [
        ("overlays/dev", "in-cluster"),
        ("overlays/prod", "managed"),
        ("all-components", "in-cluster"),
    ],
)
def test_network_policies_allow_exactly_the_data_flow(rendered, target, datastores):
    objects = rendered[target]
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    deny = find(objects, "NetworkPolicy", "default-deny-all")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert all(p["metadata"]["namespace"] == "genmesh" for p in policies)
    pods = [*workload_endpoints(objects, "genmesh", NS_LABELS), STRANGER]
    allowed = PolicySet(policies).allowed_connections([*pods, *OUTSIDE], "genmesh")
    expected = expected_flows(datastores)
    assert allowed - expected == set(), "allowed beyond the data flow"
    assert expected - allowed == set(), "data flow blocked"


def test_only_envoy_and_the_data_flow_reach_grpc_ports(rendered):
    objects = rendered["overlays/prod"]
    policies = PolicySet(o for o in objects if o["kind"] == "NetworkPolicy")
    pods = {e.name: e for e in workload_endpoints(objects, "genmesh", NS_LABELS)}
    everyone = [*pods.values(), STRANGER, *OUTSIDE]
    callers = {
        "generation": {"gateway", "telemetry"},
        "quota": {"gateway", "generation", "telemetry"},
        "telemetry": {"gateway", "generation", "quota"},
    }
    for name, expected_callers in callers.items():
        port = SERVICES[name].grpc_port
        reach = {
            e.name
            for e in everyone
            if e is not pods[name] and policies.allows(e, pods[name], port, "TCP")
        }
        assert reach == expected_callers, name


@pytest.mark.parametrize("target", ["overlays/dev", "overlays/prod", "all-components"])
def test_only_prometheus_reaches_the_gateway_ops_port_and_nobody_the_admin_port(rendered, target):
    objects = rendered[target]
    policies = PolicySet(o for o in objects if o["kind"] == "NetworkPolicy")
    pods = {e.name: e for e in workload_endpoints(objects, "genmesh", NS_LABELS)}
    everyone = [*pods.values(), STRANGER, *OUTSIDE]
    gateway = pods["gateway"]
    assert {e.name for e in everyone if policies.allows(e, gateway, 9902, "TCP")} == {"prometheus"}
    assert not [e.name for e in everyone if policies.allows(e, gateway, 9901, "TCP")]


def test_without_the_component_nothing_is_isolated(rendered):
    assert not [o for o in rendered["base"] if o["kind"] == "NetworkPolicy"]


# --- production: complete by default ------------------------------------------------------------

# Where a prod workload may connect besides its siblings: PostgreSQL, Redis, the model endpoint
# (public HTTPS), the trace collector and DNS. Nothing else (the cloud metadata server, the VPC,
# other namespaces, the pods of this namespace that are not ours).
PROD_EGRESS_OUTSIDE = {"managed-postgres", "managed-redis", "internet", "internet-v6"} | {
    "otel-collector",
    "kube-dns",
}
OURS = {"gateway", "generation", "quota", "telemetry"}


def _prod_deployments(rendered) -> list[Obj]:
    prod = deployments(rendered["overlays/prod"])
    assert {d["metadata"]["name"] for d in prod} == OURS
    return prod


def test_prod_deployments_have_probes_limits_and_a_hardened_security_context(rendered):
    for deployment in _prod_deployments(rendered):
        name = deployment["metadata"]["name"]
        spec = deployment["spec"]["template"]["spec"]
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == 10001, name
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            where = f"{name}/{container['name']}"
            assert (
                validate.security_context_errors(where, container["securityContext"], pod_sc) == []
            )
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory", "ephemeral-storage"} <= set(
                    container["resources"][kind]
                ), where
        (container,) = spec["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["periodSeconds"] > 0, f"{name} {probe}"
            assert container[probe]["timeoutSeconds"] > 0, f"{name} {probe}"


def test_prod_deployments_each_have_a_budget_an_autoscaler_and_network_policies(rendered):
    objects = rendered["overlays/prod"]
    assert validate.production_errors(objects) == []
    for deployment in _prod_deployments(rendered):
        name = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        (pdb,) = [
            o
            for o in objects
            if o["kind"] == "PodDisruptionBudget"
            and validate.selects(o["spec"]["selector"], labels)
        ]
        assert pdb["spec"]["maxUnavailable"] == 1, name
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow", name
        hpa = find(objects, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["minReplicas"] >= 2, name
        assert "replicas" not in deployment["spec"], name
        own = [
            o
            for o in objects
            if o["kind"] == "NetworkPolicy"
            and o["spec"]["podSelector"].get("matchLabels") == {"app.kubernetes.io/name": name}
        ]
        assert [o["spec"]["policyTypes"] for o in own] == [["Ingress", "Egress"]], name


def test_generation_scales_on_upstream_calls_in_flight_and_the_others_on_cpu(rendered):
    """Generation waits on the model: CPU stays low while calls pile up against
    GEN_MAX_INFLIGHT. Its HPA follows the gauge the service exports, through the documented
    prometheus-adapter rule; quota, telemetry and the gateway scale on CPU."""
    objects = rendered["overlays/prod"]
    metric_name = INFLIGHT._name  # the exported name: genmesh_generation_inflight
    assert metric_name == validate.GENERATION_SCALING_METRIC
    hpa = find(objects, "HorizontalPodAutoscaler", "generation")
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert [p["metric"]["name"] for p in pods] == [metric_name]
    (generation,) = find(objects, "Deployment", "generation")["spec"]["template"]["spec"][
        "containers"
    ]
    cap = int(validate.config_map_values(objects, generation)["GEN_MAX_INFLIGHT"])
    target = int(pods[0]["target"]["averageValue"])
    assert 0 < target < cap  # scale before replicas shed load
    rules = yaml.safe_load(
        (REPO / "deploy/k8s/components/hpa/prometheus-adapter-rules.yaml").read_text()
    )
    (rule,) = rules["rules"]["custom"]
    assert rule["seriesQuery"].startswith(metric_name + "{")
    assert rule["name"]["as"] == metric_name
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    for name in ("quota", "telemetry", "gateway"):
        metrics = find(objects, "HorizontalPodAutoscaler", name)["spec"]["metrics"]
        assert [(m["type"], m["resource"]["name"]) for m in metrics] == [("Resource", "cpu")]
    # Without the in-flight metric the rule fails.
    broken = copy.deepcopy(objects)
    find(broken, "HorizontalPodAutoscaler", "generation")["spec"]["metrics"] = [
        m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"
    ]
    assert any(metric_name in e for e in validate.production_errors(broken))


def test_prod_egress_goes_only_to_the_datastores_the_model_the_collector_and_dns(rendered):
    objects = rendered["overlays/prod"]
    policies = PolicySet(o for o in objects if o["kind"] == "NetworkPolicy")
    pods = {e.name: e for e in workload_endpoints(objects, "genmesh", NS_LABELS)}
    everyone = [*pods.values(), STRANGER, *OUTSIDE]
    allowed = policies.allowed_connections(everyone, "genmesh")
    for name in OURS:
        destinations = {c.destination for c in allowed if c.source == name}
        assert destinations <= OURS | PROD_EGRESS_OUTSIDE, name
        assert "kube-dns" in destinations, name

    # Each service's own needs, exactly.
    def reach(name: str) -> set[str]:
        return {c.destination for c in allowed if c.source == name} - {"kube-dns", name}

    assert reach("gateway") == {"generation", "quota", "telemetry"}
    assert reach("generation") == {
        "quota",
        "telemetry",
        "managed-redis",
        "internet",
        "internet-v6",
        "otel-collector",
    }
    assert reach("quota") == {"telemetry", "managed-postgres", "managed-redis", "otel-collector"}
    assert reach("telemetry") == {
        "generation",
        "quota",
        "managed-postgres",
        "managed-redis",
        "otel-collector",
    }
    assert reach("events-retention") == {"managed-postgres"}


def test_prod_ingress_comes_only_from_the_gateway_and_each_other(rendered):
    objects = rendered["overlays/prod"]
    policies = PolicySet(o for o in objects if o["kind"] == "NetworkPolicy")
    pods = {e.name: e for e in workload_endpoints(objects, "genmesh", NS_LABELS)}
    everyone = [*pods.values(), STRANGER, *OUTSIDE]
    allowed = policies.allowed_connections(everyone, "genmesh")
    for name in OURS - {"gateway"}:
        service = SERVICES[name]
        grpc_callers = {
            c.source for c in allowed if c.destination == name and c.port == service.grpc_port
        }
        assert grpc_callers <= OURS - {name}, name
        assert "gateway" in grpc_callers, name
        metrics = {
            c.source for c in allowed if c.destination == name and c.port == service.metrics_port
        }
        assert metrics == {"prometheus", "grafana"}, name  # the monitoring namespace
        ports = {c.port for c in allowed if c.destination == name}
        assert ports == {service.grpc_port, service.metrics_port}, name
    # The gateway: its public listener from anywhere; its ops listener from Prometheus only.
    gateway = {(c.source, c.port) for c in allowed if c.destination == "gateway"}
    assert {port for _, port in gateway} == {8080, 9902}
    assert {source for source, port in gateway if port == 9902} == {"prometheus"}
    assert not [c for c in allowed if c.destination == "events-retention"]


def test_production_rules_catch_regressions(rendered):
    objects = copy.deepcopy(rendered["overlays/prod"])
    objects.remove(find(objects, "PodDisruptionBudget", "quota"))
    objects.remove(find(objects, "HorizontalPodAutoscaler", "telemetry"))
    objects.remove(find(objects, "NetworkPolicy", "gateway"))
    errors = "\n".join(validate.policy_errors(objects, TARGETS["overlays/prod"]))
    assert "Deployment/quota: needs exactly one PodDisruptionBudget" in errors
    assert "Deployment/telemetry: needs exactly one HorizontalPodAutoscaler" in errors
    assert "Deployment/gateway: needs its own NetworkPolicy for ingress and egress" in errors
    # Dev and the base are not production: no such rule there.
    assert validate.policy_errors(rendered["overlays/dev"], TARGETS["overlays/dev"]) == []


# --- draining: Envoy and the services ----------------------------------------------------------


def _gateway_container(objects: list[Obj]) -> Obj:
    (container,) = find(objects, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    result: Obj = container
    return result


@pytest.mark.parametrize("target", list(TARGETS))
def test_gateway_drains_for_the_longest_request_before_envoy_gets_sigterm(rendered, target):
    objects = rendered[target]
    deployment = find(objects, "Deployment", "gateway")
    container = _gateway_container(objects)
    # The image's command: render.py --exec starts Envoy with --drain-strategy immediate and
    # --drain-time-s GATEWAY_DRAIN_TIME_SECONDS (80 unless the config says otherwise).
    assert container["command"] == [*validate.GATEWAY_RENDER, "--out", "/tmp/envoy.yaml", "--exec"]
    settings = validate.config_map_values(objects, container)
    drain_time = int(
        settings.get("GATEWAY_DRAIN_TIME_SECONDS", GatewaySettings().drain_time_seconds)
    )
    assert GatewaySettings().drain_time_seconds == validate.GATEWAY_DEFAULT_DRAIN_TIME_SECONDS
    hook = container["lifecycle"]["preStop"]["exec"]["command"]
    settle, limit = float(hook[-2]), float(hook[-1])
    assert settle >= 10  # the endpoint removal reaches the load balancer and Envoy's peers
    assert limit >= settle + validate.longest_deadline(objects) == settle + 60
    assert drain_time >= limit  # listeners (and liveness) stay up while the hook waits
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= limit + 5
    assert validate.gateway_drain_errors(objects, deployment, container) == []


def test_drain_rules_catch_regressions(rendered):
    objects = copy.deepcopy(rendered["base"])
    deployment = find(objects, "Deployment", "gateway")
    container = _gateway_container(objects)
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30
    # Envoy started some other way would not get the drain options.
    container["command"] = ["envoy", "-c", "/tmp/envoy.yaml", "--drain-time-s", "20"]
    config = next(o for o in objects if o["metadata"]["name"].startswith("gateway-config"))
    config["data"]["GATEWAY_GENERATE_STREAM_TIMEOUT_SECONDS"] = "300"
    config["data"]["GATEWAY_DRAIN_TIME_SECONDS"] = "20"
    errors = "\n".join(validate.policy_errors(objects, TARGETS["base"]))
    assert "the command must be the image's (python3 -m services.gateway.render" in errors
    assert "drain options come from render.py (GATEWAY_DRAIN_TIME_SECONDS), not the" in errors
    assert "the preStop drain waits at most 80 s < 15 s (endpoint removal) + 300 s" in errors
    assert "GATEWAY_DRAIN_TIME_SECONDS 20 < the preStop's 80 s" in errors
    assert "terminationGracePeriodSeconds 30 < the preStop drain 80 s" in errors
    assert "SHUTDOWN_GRACE_SECONDS 60 must cover the longest generate deadline (300 s" in errors
    container["lifecycle"]["preStop"] = {"sleep": {"seconds": 15}}
    assert "must POST /drain_listeners?graceful" in "\n".join(
        validate.gateway_drain_errors(objects, deployment, container)
    )


def test_the_gateway_command_and_pre_stop_drain_a_real_envoy(rendered, tmp_path):
    """The Deployment's own command starts Envoy with the drain options (render.py's); its
    preStop hook drains it: Envoy then closes each connection after its response yet still
    accepts new
    ones, and the hook returns once the request in flight has finished, not before."""
    container = _gateway_container(rendered["base"])
    config = tmp_path / "envoy.yaml"
    command = [
        sys.executable if arg == "python3" else arg.replace("/tmp/envoy.yaml", str(config))
        for arg in container["command"]
    ]
    public, admin, ops = free_port(), free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "SUPABASE_"))},
        "PYTHONPATH": str(REPO),
        "GATEWAY_LISTEN_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(public),
        "GATEWAY_ADMIN_PORT": str(admin),
        "GATEWAY_OPS_PORT": str(ops),
        # Nothing listens there: Envoy starts all the same and answers 503.
        "GENERATION_ADDR": f"127.0.0.1:{free_port()}",
        "QUOTA_ADDR": f"127.0.0.1:{free_port()}",
        "TELEMETRY_ADDR": f"127.0.0.1:{free_port()}",
    }
    log = (tmp_path / "envoy.log").open("wb")
    envoy = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{admin}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert envoy.poll() is None, (tmp_path / "envoy.log").read_text()
            try:
                info = httpx.get(f"{base}/server_info", timeout=1).json()
                if info["state"] == "LIVE":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        options = info["command_line_options"]
        assert (options["drain_strategy"], options["drain_time"]) == ("Immediate", "80s")
        # A request in flight: headers sent, the body not yet complete.
        held = socket.create_connection(("127.0.0.1", public))
        held.sendall(
            b"POST /api/feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        time.sleep(0.3)
        hook = container["lifecycle"]["preStop"]["exec"]["command"]
        script = hook[2]
        started = time.monotonic()
        pre_stop = subprocess.Popen(
            [sys.executable, "-c", script, "0.5", "20"], env={**env, "PATH": os.environ["PATH"]}
        )
        time.sleep(1.5)
        assert pre_stop.poll() is None, "the hook returned while a request was in flight"
        during = httpx.get(f"http://127.0.0.1:{public}/api/quota", timeout=5)
        assert during.headers["connection"] == "close"  # drained: served, then closed
        held.close()
        assert pre_stop.wait(timeout=10) == 0
        assert 1.5 < time.monotonic() - started < 10
    finally:
        envoy.kill()
        envoy.wait()
        log.close()


def test_pre_stop_gives_the_endpoints_time_even_when_envoy_does_not_answer(rendered):
    """With the admin API gone, the hook still waits for the endpoint removal, then returns."""
    hook = _gateway_container(rendered["base"])["lifecycle"]["preStop"]["exec"]["command"]
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", hook[2], "1", "5"],
        env={**os.environ, "GATEWAY_ADMIN_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0
    assert "drain_listeners failed" in result.stderr
    assert 1 <= time.monotonic() - started < 4


# --- the Makefile entry point --------------------------------------------------------------------


def test_validate_script_passes_and_summarises(kubectl):
    result = subprocess.run(
        [sys.executable, str(VALIDATE_PY)], capture_output=True, text=True, check=False, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("all manifests valid")
    for name in TARGETS:
        assert f"ok   {name}" in result.stdout or f"ok  {name}" in result.stdout


def test_validate_reports_a_broken_kustomization(kubectl, tmp_path, monkeypatch):
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    monkeypatch.setattr(validate, "K8S_DIR", tmp_path)
    report = validate.check(validate.Target("broken", "."), ["1.33.0"])
    assert not report.ok
    assert report.render_error
    assert validate.summary(report)[0].startswith("FAIL broken")


def test_validate_exits_2_without_kubectl(monkeypatch, capsys):
    def missing() -> str:
        raise validate.KubectlNotFoundError("kubectl not found")

    monkeypatch.setattr(validate, "kubectl_binary", missing)
    assert validate.main([]) == 2
    assert "kubectl not found" in capsys.readouterr().err
