"""The gRPC face of the quota ledger: read the caller, call the ledger, map to protos."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from genmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from services.common.identity import Identity, identity_from_metadata
from services.quota.ledger import QuotaLedger
from services.quota.plans import QuotaStatus
from services.quota.reservations import Settlement

Context = grpc.aio.ServicerContext[Any, Any]

_SETTLEMENTS = {
    quota_pb2.OUTCOME_COMMIT: Settlement.COMMIT,
    quota_pb2.OUTCOME_REFUND: Settlement.REFUND,
}


def _timestamp(value: Any) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def quota_message(status: QuotaStatus) -> quota_pb2.Quota:
    return quota_pb2.Quota(
        plan=status.plan.value,
        limit=status.limit,
        used=status.used,
        remaining=status.remaining,
        resets_at=_timestamp(status.resets_at),
    )


def _caller(context: Context) -> Identity:
    return identity_from_metadata(tuple(context.invocation_metadata() or ()), context.peer())


class QuotaServicer(quota_pb2_grpc.QuotaServiceServicer):
    def __init__(self, ledger: QuotaLedger) -> None:
        self.ledger = ledger

    async def GetQuota(
        self, request: quota_pb2.GetQuotaRequest, context: Context
    ) -> quota_pb2.Quota:
        return quota_message(await self.ledger.quota(_caller(context)))

    async def GetProfile(
        self, request: quota_pb2.GetProfileRequest, context: Context
    ) -> quota_pb2.Profile:
        view = await self.ledger.profile(_caller(context))
        return quota_pb2.Profile(
            user_id=view.profile.user_id,
            email=view.profile.email,
            is_pro=view.profile.is_pro,
            plan=view.plan.value,
            quota=quota_message(view.quota),
            last_reset_time=_timestamp(view.profile.last_reset_time),
            created_at=_timestamp(view.profile.created_at),
        )

    async def ReserveQuota(
        self, request: quota_pb2.ReserveQuotaRequest, context: Context
    ) -> quota_pb2.Reservation:
        caller = request.caller
        reserved = await self.ledger.reserve(
            Identity(user_id=caller.user_id, email=caller.email, client_ip=caller.client_ip)
        )
        return quota_pb2.Reservation(
            reservation_id=reserved.reservation_id, quota=quota_message(reserved.quota)
        )

    async def SettleReservation(
        self, request: quota_pb2.SettleReservationRequest, context: Context
    ) -> quota_pb2.SettleReservationResponse:
        settled = await self.ledger.settle(request.reservation_id, _SETTLEMENTS[request.outcome])
        response = quota_pb2.SettleReservationResponse(applied=settled.applied)
        if settled.quota is not None:
            response.quota.CopyFrom(quota_message(settled.quota))
        return response
