"""`python -m simulator`: serve until SIGINT/SIGTERM, then shut down gracefully."""

from __future__ import annotations

import asyncio
import logging
import signal

from pydantic import ValidationError

from simulator.app import start
from simulator.settings import SimSettings

log = logging.getLogger("simulator")


async def serve(settings: SimSettings) -> None:
    runner, url = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("OpenAI simulator listening on %s (OPENAI_BASE_URL=%s/v1)", url, url)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await runner.cleanup()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = SimSettings()
    except ValidationError as exc:
        raise SystemExit(f"invalid SIM_* settings:\n{exc}") from None
    try:
        asyncio.run(serve(settings))
    except OSError as exc:  # typically the port is taken
        raise SystemExit(f"cannot listen on {settings.host}:{settings.port}: {exc}") from None


if __name__ == "__main__":
    main()
