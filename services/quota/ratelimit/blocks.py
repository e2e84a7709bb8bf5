"""What operators do with blocks: list the blocks in force, and lift one. Lifting is a
security event (an admin action that lets a caller back in)."""

from __future__ import annotations

import ipaddress

import grpc

from services.common.client_networks import ClientNetworks
from services.common.errors import FieldViolation, Reason, ServiceError, invalid_argument
from services.common.identity import Identity
from services.common.redis import RedisUnavailable
from services.common.security_events import SEVERITY_LOW, SecurityEventSink
from services.quota.ratelimit.config import Scope
from services.quota.ratelimit.limiter import Block, Limiter, Subject


class BlockAdmin:
    def __init__(
        self,
        limiter: Limiter,
        networks: ClientNetworks,
        security_events: SecurityEventSink | None = None,
    ) -> None:
        self.limiter = limiter
        self.networks = networks
        self.security_events = security_events

    async def blocks(self) -> list[Block]:
        return await self.limiter.blocks()

    def subject(self, scope: str, value: str) -> Subject:
        """The subject an operator means: for `ip`, any address of the network or the
        network as listed (`2001:db8:1:2::/64`), counted with the configured prefixes."""
        if scope == Scope.USER.value:
            return Subject(Scope.USER, value)
        try:
            address = str(ipaddress.ip_network(value.strip(), strict=False).network_address)
        except ValueError:
            address = ""
        network = self.networks.network_of(address)
        if not network:
            raise invalid_argument(FieldViolation("subject", "not an IP address or network"))
        return Subject(Scope.IP, network)

    async def lift(self, scope: str, value: str, operator: Identity) -> bool:
        subject = self.subject(scope, value)
        try:
            lifted = await self.limiter.lift(subject)
        except RedisUnavailable:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.DEPENDENCY_UNAVAILABLE,
                "Redis is unreachable: the block was lifted in this replica only and would "
                "be in force again once Redis is back; try again shortly",
                retry_after_seconds=5,
            ) from None
        if self.security_events is not None:
            self.security_events.report(
                "rate_limit_block_lifted",
                SEVERITY_LOW,
                operator,
                {"scope": subject.scope.value, "subject": subject.value, "lifted": str(lifted)},
            )
        return lifted
