"""Which network a client IP counts as, for every service that counts clients: the quota
service (guests' daily quotas, per-IP rate limits, blocks) and telemetry (bursts of edge
failures). They must agree, so both read the same settings (`ClientNetworkSettings`).

A client counts as a network prefix, not a single address: an IPv6 subscriber usually holds a
whole /64 and can pick a fresh address from it for every request, so counting /128s would give
one person unlimited guests and split one attacker's burst into harmless single requests. IPv4
counts per address (/32) by default; both prefix lengths are settings.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_IPV4_PREFIX_LENGTH = 32
DEFAULT_IPV6_PREFIX_LENGTH = 64


class ClientNetworkSettings(BaseSettings):
    """The prefix lengths a client network has; mixed into the settings of every service that
    counts clients."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    # IPv4-mapped IPv6 addresses count as IPv4.
    client_ipv4_prefix_length: int = Field(
        default=DEFAULT_IPV4_PREFIX_LENGTH, alias="CLIENT_IPV4_PREFIX_LENGTH", ge=1, le=32
    )
    client_ipv6_prefix_length: int = Field(
        default=DEFAULT_IPV6_PREFIX_LENGTH, alias="CLIENT_IPV6_PREFIX_LENGTH", ge=1, le=128
    )

    @property
    def client_networks(self) -> ClientNetworks:
        return ClientNetworks(self.client_ipv4_prefix_length, self.client_ipv6_prefix_length)


@dataclass(frozen=True)
class ClientNetworks:
    ipv4_prefix: int = DEFAULT_IPV4_PREFIX_LENGTH
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX_LENGTH

    def __post_init__(self) -> None:
        if not 0 < self.ipv4_prefix <= 32:
            raise ValueError(f"IPv4 prefix length must be 1-32, got {self.ipv4_prefix}")
        if not 0 < self.ipv6_prefix <= 128:
            raise ValueError(f"IPv6 prefix length must be 1-128, got {self.ipv6_prefix}")

    def network_of(self, ip: str) -> str:
        """One spelling per counted network: `203.0.113.7` (a whole-address prefix is written
        as the address), `2001:db8:1:2::/64`. IPv4-mapped IPv6 (`::ffff:203.0.113.7`) counts
        as the IPv4 address it carries. Empty when `ip` is not an IP address: such a caller
        has no network to count, and callers decide what that means."""
        return _network_of(ip, self.ipv4_prefix, self.ipv6_prefix)


# Every rate-limit decision and quota call asks for its caller's network, and the same clients
# call again and again: parsing with ipaddress is most of the cost, so answers are kept for the
# most recent addresses.
@functools.lru_cache(maxsize=8192)
def _network_of(ip: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return ""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    if prefix == address.max_prefixlen:
        return str(address)
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


# IPv4 /32, IPv6 /64: what callers count with when they are not given configured prefixes.
DEFAULT_NETWORKS = ClientNetworks()
