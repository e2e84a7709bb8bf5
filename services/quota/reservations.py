"""Reservations: how they settle, and their ids.

Reservation ids say where the reservation lives, so a settlement knows where to look:
`g_<uuid hex>` for a guest (Redis, or the in-memory fallback), `u_<uuid>` for a signed-in user
(a `quota_reservations` row). Both stay under the proto's 64 characters."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum

GUEST_PREFIX = "g_"
USER_PREFIX = "u_"


class Settlement(StrEnum):
    """How a reservation ends; the values are the `quota_reservations.state` it ends in."""

    COMMIT = "committed"
    REFUND = "refunded"


class ReservationKind(StrEnum):
    GUEST = "guest"
    USER = "user"


@dataclass(frozen=True)
class ReservationId:
    kind: ReservationKind
    uuid: uuid.UUID

    def __str__(self) -> str:
        if self.kind is ReservationKind.GUEST:
            return GUEST_PREFIX + self.uuid.hex
        return USER_PREFIX + str(self.uuid)


def new_reservation_id(kind: ReservationKind) -> ReservationId:
    return ReservationId(kind, uuid.uuid4())


def parse_reservation_id(text: str) -> ReservationId | None:
    """The id's parts, or None when this service cannot have issued it."""
    for prefix, kind in (
        (GUEST_PREFIX, ReservationKind.GUEST),
        (USER_PREFIX, ReservationKind.USER),
    ):
        if text.startswith(prefix):
            try:
                parsed = ReservationId(kind, uuid.UUID(text.removeprefix(prefix)))
            except ValueError:
                return None
            # uuid.UUID accepts braces, "urn:uuid:" and other spellings we never issue.
            return parsed if str(parsed) == text else None
    return None
