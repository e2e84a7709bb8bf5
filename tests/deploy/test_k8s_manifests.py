"""The Kubernetes manifests in deploy/k8s: every kustomize target renders, validates against the
bundled Kubernetes schemas (strict, offline), and has the properties that matter: hardened pods,
gRPC probes on the right ports, termination budgets, no committed secrets, and network policies
that allow exactly the data flow. Uses the same functions as `deploy/k8s/validate.py`."""

from __future__ import annotations

import base64
import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from services.gateway.settings import GatewaySettings
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
        for container in spec["containers"]:
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


def test_services_get_exactly_the_secret_keys_they_need(rendered):
    objects = rendered["base"]

    def secret_keys(name: str) -> set[str]:
        (container,) = validate.pod_spec(
            find(objects, "Job" if name == "migrate" else "Deployment", name)
        )["containers"]
        keys = set()
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "genmesh-secrets"
                assert env["name"] == ref["key"]
                keys.add(ref["key"])
        return keys

    assert secret_keys("generation") == {"REDIS_URL", "OPENAI_API_KEY", "GENMESH_ADMIN_TOKEN"}
    assert secret_keys("quota") == {"DATABASE_URL", "REDIS_URL", "GENMESH_ADMIN_TOKEN"}
    assert secret_keys("telemetry") == {"DATABASE_URL", "REDIS_URL", "GENMESH_ADMIN_TOKEN"}
    assert secret_keys("gateway") == {"SUPABASE_JWT_SECRET"}
    assert secret_keys("migrate") == {"DATABASE_URL"}


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
        assert container["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
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


def test_migration_job_runs_the_migrations_from_the_quota_image(rendered):
    for target in TARGETS:
        job = find(rendered[target], "Job", "migrate")
        (container,) = job["spec"]["template"]["spec"]["containers"]
        quota = find(rendered[target], "Deployment", "quota")
        assert container["image"] == quota["spec"]["template"]["spec"]["containers"][0]["image"]
        assert container["command"] == ["python", "-m", "services.common.migrations"]
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
        assert job["spec"]["backoffLimit"] > 0


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
        "REDIS_URL",
        "OPENAI_API_KEY",
        "SUPABASE_JWT_SECRET",
        "GENMESH_ADMIN_TOKEN",
        "POSTGRES_PASSWORD",
        "REDIS_PASSWORD",
    }
    assert validate.secret_errors([secret], fake_allowed=True) == []
    # Every reference follows the generated name.
    for _obj, spec in pod_specs(rendered["overlays/dev"]):
        for container in spec["containers"]:
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
    pods = ["gateway", "generation", "quota", "telemetry", "migrate", "stranger"]
    if datastores == "in-cluster":
        pods += ["postgres", "redis"]
        flows |= {c(s, "postgres", 5432) for s in ("quota", "telemetry", "migrate")}
        flows |= {c(s, "redis", 6379) for s in ("generation", "quota", "telemetry")}
    else:
        flows |= {c(s, "managed-postgres", 5432) for s in ("quota", "telemetry", "migrate")}
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
