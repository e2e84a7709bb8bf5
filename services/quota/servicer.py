"""The gRPC faces of the quota service: the ledger (quotas, profiles, reservations) and the
operators' view of rate-limit blocks. Read the caller, call the domain code, map to protos.
(Envoy's rate limit service is in ratelimit/rls.py.)"""

from __future__ import annotations

import math
import time
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from genmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from services.common.admin_auth import AdminGuard
from services.common.identity import Identity, identity_from_metadata
from services.quota.ledger import QuotaLedger
from services.quota.plans import QuotaStatus
from services.quota.ratelimit.blocks import BlockAdmin
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
            Identity(user_id=caller.user_id, email=caller.email, client_ip=caller.client_ip),
            consume=request.consume,
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


class QuotaAdminServicer(quota_pb2_grpc.QuotaAdminServiceServicer):
    def __init__(self, guard: AdminGuard, blocks: BlockAdmin) -> None:
        self.guard = guard
        self.blocks = blocks

    def _authorize(self, context: Context, method: str) -> Identity:
        caller = _caller(context)
        self.guard.check(tuple(context.invocation_metadata() or ()), caller, method)
        return caller

    async def ListBlocks(
        self, request: quota_pb2.ListBlocksRequest, context: Context
    ) -> quota_pb2.ListBlocksResponse:
        self._authorize(context, "ListBlocks")
        now_ms = time.time() * 1000
        response = quota_pb2.ListBlocksResponse()
        for block in await self.blocks.blocks():
            out = response.blocks.add(
                scope=block.subject.scope.value,
                subject=block.subject.value,
                level=block.level,
                remaining_seconds=max(0, math.ceil((block.until_ms - now_ms) / 1000)),
                backend=block.backend,
            )
            out.blocked_until.FromMilliseconds(block.until_ms)
        return response

    async def LiftBlock(
        self, request: quota_pb2.LiftBlockRequest, context: Context
    ) -> quota_pb2.LiftBlockResponse:
        operator = self._authorize(context, "LiftBlock")
        lifted = await self.blocks.lift(request.scope, request.subject, operator)
        return quota_pb2.LiftBlockResponse(lifted=lifted)
