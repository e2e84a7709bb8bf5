"""The quota ledger: what the RPCs do, without gRPC. Guests are counted per client IP in the
guest store, signed-in users per profile in PostgreSQL; units are reserved before a generation
and committed or refunded after it, or consumed (taken committed, in one store operation) for
an answer already in hand."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from services.common.client_networks import ClientNetworks
from services.common.errors import FieldViolation, Reason, ServiceError, invalid_argument
from services.common.identity import Identity
from services.quota.clock import QuotaClock, QuotaWindow
from services.quota.guest_store import GuestQuotaStore, guest_tag
from services.quota.plans import Plan, QuotaLimits, QuotaStatus, quota_exhausted, user_plan
from services.quota.profile_cache import ProfileCache
from services.quota.profile_store import ProfileRecord, ProfileStore
from services.quota.reservations import (
    ReservationKind,
    Settlement,
    new_guest_reservation,
    new_user_reservation,
    parse_reservation_id,
)


@dataclass(frozen=True)
class ProfileView:
    profile: ProfileRecord
    plan: Plan
    quota: QuotaStatus


@dataclass(frozen=True)
class Reserved:
    reservation_id: str
    quota: QuotaStatus


@dataclass(frozen=True)
class Settled:
    applied: bool
    # None when the reservation is unknown (or expired): there is no one to report on.
    quota: QuotaStatus | None


def unauthenticated() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAUTHENTICATED, Reason.UNAUTHENTICATED, "sign in to see your profile"
    )


class QuotaLedger:
    def __init__(
        self,
        clock: QuotaClock,
        limits: QuotaLimits,
        guests: GuestQuotaStore,
        profiles: ProfileStore,
        cache: ProfileCache,
        networks: ClientNetworks,
    ) -> None:
        self.clock = clock
        self.limits = limits
        self.guests = guests
        self.profiles = profiles
        self.cache = cache
        self.networks = networks

    # -- reads ---------------------------------------------------------------------------------

    async def quota(self, caller: Identity) -> QuotaStatus:
        """The caller's quota for today (a guest's by client network)."""
        window = self.clock.window()
        if caller.user_id:
            return self._user_status(await self._profile(caller, window), window)
        network = self._guest_network(caller)
        return self._guest_status(await self.guests.used(network, window), window)

    async def profile(self, caller: Identity) -> ProfileView:
        """The signed-in caller's profile, created on first sight. Guests have none."""
        if not caller.user_id:
            raise unauthenticated()
        window = self.clock.window()
        profile = await self._profile(caller, window)
        return ProfileView(profile, user_plan(profile.is_pro), self._user_status(profile, window))

    # -- reservations --------------------------------------------------------------------------

    async def reserve(self, caller: Identity, *, consume: bool = False) -> Reserved:
        """Take one unit for a generation, or fail with QUOTA_EXHAUSTED until the reset.

        With `consume`, the unit is taken for good in the same single store operation (an
        answer already in hand, which cannot fail after it): nothing is left pending to settle
        or expire, and settling the id returned later is a no-op (applied=False)."""
        window = self.clock.window()
        if caller.user_id:
            reservation = new_user_reservation()
            try:
                result = await self.profiles.reserve(
                    caller.user_id, caller.email, window, reservation.uuid, consume=consume
                )
            finally:
                # Even a failed attempt may have reset or created the profile.
                await self.cache.invalidate(caller.user_id)
            status = self._user_status(result.profile, window)
            reserved = result.reserved
        else:
            network = self._guest_network(caller)
            reservation = new_guest_reservation(guest_tag(network, window.day))
            outcome = await self.guests.reserve(
                network, window, self.limits.guest, reservation, consume=consume
            )
            status = self._guest_status(outcome.used, window)
            reserved = outcome.reserved
        if not reserved:
            raise quota_exhausted(status, window.seconds_until_reset)
        return Reserved(str(reservation), status)

    async def consume(self, caller: Identity) -> Reserved:
        """`reserve(caller, consume=True)`: one unit, committed at once."""
        return await self.reserve(caller, consume=True)

    async def settle(self, reservation_id: str, settlement: Settlement) -> Settled:
        """Commit or refund a reservation. Only the first settlement counts (applied=True); a
        later one, or one for an unknown or expired reservation, returns applied=False. A refund
        settled on a later day than its reservation settles it but gives back none of today's
        units (a user's reservation row outlives its day; a guest's expires with it)."""
        reservation = parse_reservation_id(reservation_id)
        if reservation is None:
            raise invalid_argument(
                FieldViolation("reservation_id", "not a reservation id issued by this service")
            )
        window = self.clock.window()
        if reservation.kind is ReservationKind.USER:
            user = await self.profiles.settle(reservation.uuid, settlement)
            if user is None:
                return Settled(applied=False, quota=None)
            await self.cache.invalidate(user.profile.user_id)
            return Settled(user.applied, self._user_status(user.profile, window))
        guest = await self.guests.settle(reservation, settlement)
        if guest is None:
            return Settled(applied=False, quota=None)
        used = guest.used
        if guest.day != window.day:
            # Settled on a later day than it was made: report today's count instead.
            used = await self.guests.used(guest.network, window)
        return Settled(guest.applied, self._guest_status(used, window))

    # -- helpers -------------------------------------------------------------------------------

    async def _profile(self, caller: Identity, window: QuotaWindow) -> ProfileRecord:
        cached = await self.cache.lookup(caller.user_id)
        hit = cached.profile
        if hit is None:
            profile = await self.profiles.load(caller.user_id, caller.email, window)
            await self.cache.store(profile, cached.fence)
            return profile
        if not hit.needs_reset(window) and (not caller.email or caller.email == hit.email):
            return hit
        # A new day or a new email: the load writes the profile, so the entry must go.
        profile = await self.profiles.load(caller.user_id, caller.email, window)
        await self.cache.invalidate(caller.user_id)
        return profile

    def _guest_network(self, caller: Identity) -> str:
        network = self.networks.network_of(caller.client_ip)
        if not network:
            raise invalid_argument(
                FieldViolation(
                    "client_ip", "the client IP is unknown or not an IP, so no guest quota applies"
                )
            )
        return network

    def _user_status(self, profile: ProfileRecord, window: QuotaWindow) -> QuotaStatus:
        plan = user_plan(profile.is_pro)
        return QuotaStatus(
            plan, self.limits.for_plan(plan), profile.used_in(window), window.resets_at
        )

    def _guest_status(self, used: int, window: QuotaWindow) -> QuotaStatus:
        return QuotaStatus(Plan.GUEST, self.limits.guest, used, window.resets_at)
