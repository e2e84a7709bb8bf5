"""`python -m services.generation`: serve until SIGTERM/SIGINT, then stop gracefully."""

from __future__ import annotations

import asyncio

from services.common.logging import configure_logging
from services.common.tracing import configure_tracing
from services.generation.app import create_service
from services.generation.settings import GenerationSettings


async def main() -> None:
    settings = GenerationSettings()
    configure_logging("generation", settings.log_level)
    configure_tracing("generation", settings.otel_exporter_otlp_endpoint)
    service = await create_service(settings)
    await service.serve_until_signalled()


if __name__ == "__main__":
    asyncio.run(main())
