"""`python -m services.quota`: run the quota service until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio

from services.common.logging import configure_logging
from services.common.tracing import configure_tracing
from services.quota.app import create_service
from services.quota.settings import QuotaSettings


async def main() -> None:
    settings = QuotaSettings()
    configure_logging("quota", settings.log_level)
    configure_tracing("quota", settings.otel_exporter_otlp_endpoint)
    service = await create_service(settings)
    await service.serve_until_signalled()


if __name__ == "__main__":
    asyncio.run(main())
