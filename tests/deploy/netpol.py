"""A small model of Kubernetes NetworkPolicy semantics, enough to compute which connections a
set of rendered policies allows between pods and outside addresses.

It follows the API's rules: a pod is isolated for a direction only if some policy selecting it
lists that direction in policyTypes; then a connection needs a matching rule; rules and policies
are additive; a connection needs both the source's egress and the destination's ingress. Peers:
podSelector (same namespace), namespaceSelector (+ podSelector), ipBlock (with except), ports by
number, name, protocol and endPort. Selectors: matchLabels and matchExpressions.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]


@dataclass(frozen=True)
class Endpoint:
    """A pod (namespace set) or an address outside the cluster (namespace None)."""

    name: str
    ip: str
    namespace: str | None = None
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    namespace_labels: dict[str, str] = field(default_factory=dict, hash=False)
    # (port, protocol) it listens on; named ports resolve through `port_names`.
    listens: tuple[tuple[int, str], ...] = ()
    port_names: dict[str, int] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Connection:
    source: str
    destination: str
    port: int
    protocol: str = "TCP"


def selector_matches(selector: Obj | None, labels: dict[str, str]) -> bool:
    """A LabelSelector; an empty selector matches everything."""
    selector = selector or {}
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def peer_matches(peer: Obj, policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        address = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        cidr = ipaddress.ip_network(block["cidr"])
        if address.version != cidr.version or address not in cidr:
            return False
        return not any(
            address in ipaddress.ip_network(e)
            for e in block.get("except", [])
            if ipaddress.ip_network(e).version == address.version
        )
    if other.namespace is None:
        return False  # pod and namespace selectors select pods only
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], other.namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False
    return selector_matches(peer.get("podSelector"), other.labels)


def port_matches(ports: list[Obj] | None, destination: Endpoint, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        wanted = entry.get("port")
        if wanted is None:
            return True
        number: int | None = (
            destination.port_names.get(wanted) if isinstance(wanted, str) else int(wanted)
        )
        if number is None:
            continue  # a named port this destination does not have
        end: int = entry.get("endPort", number)
        if number <= port <= end:
            return True
    return False


def policy_types(policy: Obj) -> list[str]:
    """policyTypes, or the API's default: Ingress, plus Egress if there are egress rules."""
    spec = policy["spec"]
    default = ["Ingress", "Egress"] if "egress" in spec else ["Ingress"]
    types: list[str] = spec.get("policyTypes", default)
    return types


class PolicySet:
    def __init__(self, policies: Iterable[Obj]) -> None:
        self.policies = [p for p in policies if p.get("kind") == "NetworkPolicy"]

    def _selecting(self, pod: Endpoint, direction: str) -> list[Obj]:
        return [
            p
            for p in self.policies
            if pod.namespace is not None
            and p["metadata"].get("namespace") == pod.namespace
            and direction in policy_types(p)
            and selector_matches(p["spec"]["podSelector"], pod.labels)
        ]

    def _direction_allows(
        self,
        pod: Endpoint,
        other: Endpoint,
        destination: Endpoint,
        port: int,
        protocol: str,
        direction: str,
    ) -> bool:
        if pod.namespace is None:
            return True  # outside the cluster: not ours to restrict
        selecting = self._selecting(pod, direction)
        if not selecting:
            return True  # not isolated in this direction
        rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        for policy in selecting:
            for rule in policy["spec"].get(rules_key, []):
                peers = rule.get(peers_key)
                if peers and not any(
                    peer_matches(peer, policy["metadata"]["namespace"], other) for peer in peers
                ):
                    continue
                if port_matches(rule.get("ports"), destination, port, protocol):
                    return True
        return False

    def allows(self, source: Endpoint, destination: Endpoint, port: int, protocol: str) -> bool:
        return self._direction_allows(
            source, destination, destination, port, protocol, "Egress"
        ) and self._direction_allows(destination, source, destination, port, protocol, "Ingress")

    def allowed_connections(self, endpoints: list[Endpoint], namespace: str) -> set[Connection]:
        """Every allowed connection to a listening port that involves `namespace`."""
        allowed = set()
        for source in endpoints:
            for destination in endpoints:
                if source is destination or namespace not in (
                    source.namespace,
                    destination.namespace,
                ):
                    continue
                for port, protocol in destination.listens:
                    if self.allows(source, destination, port, protocol):
                        allowed.add(Connection(source.name, destination.name, port, protocol))
        return allowed


def workload_endpoints(
    objects: list[Obj], namespace: str, namespace_labels: dict[str, str]
) -> list[Endpoint]:
    """One endpoint per rendered pod template, with the template's labels and container ports."""
    endpoints = []
    kinds = {"Deployment", "StatefulSet", "Job", "DaemonSet", "CronJob"}
    for index, obj in enumerate(o for o in objects if o.get("kind") in kinds):
        spec = obj["spec"]["jobTemplate"]["spec"] if obj["kind"] == "CronJob" else obj["spec"]
        template = spec["template"]
        ports = [p for c in template["spec"]["containers"] for p in c.get("ports", [])]
        endpoints.append(
            Endpoint(
                name=obj["metadata"]["name"],
                ip=f"10.244.0.{index + 10}",
                namespace=namespace,
                labels=dict(template["metadata"].get("labels", {})),
                namespace_labels=namespace_labels,
                listens=tuple((p["containerPort"], p.get("protocol", "TCP")) for p in ports),
                port_names={p["name"]: p["containerPort"] for p in ports if "name" in p},
            )
        )
    return endpoints
