"""python -m services.telemetry"""

from __future__ import annotations

import asyncio

from services.common.logging import configure_logging
from services.common.tracing import configure_tracing
from services.telemetry.app import create_service
from services.telemetry.settings import TelemetrySettings


async def main() -> None:
    settings = TelemetrySettings()
    configure_logging("telemetry", settings.log_level)
    configure_tracing("telemetry", settings.otel_exporter_otlp_endpoint)
    service = await create_service(settings)
    await service.serve_until_signalled()


if __name__ == "__main__":
    asyncio.run(main())
