"""Reservations: how they settle, their ids, and how many expire unsettled.

Reservation ids say where the reservation lives, so a settlement knows where to look:
`g_<tag>_<uuid hex>` for a guest, where `<tag>` names the guest's state for the day (its
Redis hash tag, or its entry in the in-memory fallback), and `u_<uuid>` for a signed-in user
(a `quota_reservations` row). Both stay under the proto's 64 characters. A unit consumed at
once (ReserveQuota with `consume`) gets an id of the same shape, already committed: settling
it changes nothing (applied=False)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from enum import StrEnum

from prometheus_client import Counter

GUEST_PREFIX = "g_"
USER_PREFIX = "u_"
# A guest tag is 16 lowercase hex digits (see guest_store.guest_tag).
_GUEST_ID = re.compile(r"g_([0-9a-f]{16})_([0-9a-f]{32})")

RESERVATIONS_EXPIRED = Counter(
    "genmesh_quota_reservations_expired_total",
    "Reservations never settled within the TTL, expired with their unit given back.",
    ["store"],
)


class Settlement(StrEnum):
    """How a reservation ends; the values are the `quota_reservations.state` it ends in."""

    COMMIT = "committed"
    REFUND = "refunded"
    # No settlement came in time (the caller crashed or lost its connection between reserve
    # and settle): the unit is given back, as a refund would.
    EXPIRE = "expired"


class ReservationKind(StrEnum):
    GUEST = "guest"
    USER = "user"


@dataclass(frozen=True)
class ReservationId:
    kind: ReservationKind
    uuid: uuid.UUID
    # Guests only: which guest-day state holds the reservation.
    tag: str = ""

    def __str__(self) -> str:
        if self.kind is ReservationKind.GUEST:
            return f"{GUEST_PREFIX}{self.tag}_{self.uuid.hex}"
        return USER_PREFIX + str(self.uuid)


def new_user_reservation() -> ReservationId:
    return ReservationId(ReservationKind.USER, uuid.uuid4())


def new_guest_reservation(tag: str) -> ReservationId:
    return ReservationId(ReservationKind.GUEST, uuid.uuid4(), tag)


def parse_reservation_id(text: str) -> ReservationId | None:
    """The id's parts, or None when this service cannot have issued it."""
    if guest := _GUEST_ID.fullmatch(text):
        return ReservationId(ReservationKind.GUEST, uuid.UUID(guest[2]), guest[1])
    if text.startswith(USER_PREFIX):
        try:
            parsed = ReservationId(ReservationKind.USER, uuid.UUID(text.removeprefix(USER_PREFIX)))
        except ValueError:
            return None
        # uuid.UUID accepts braces, "urn:uuid:" and other spellings we never issue.
        return parsed if str(parsed) == text else None
    return None
