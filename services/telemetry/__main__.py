"""`python -m services.telemetry`: serve until SIGTERM/SIGINT, then stop gracefully."""

from services.common.server import run_service
from services.telemetry.app import create_service
from services.telemetry.settings import TelemetrySettings

if __name__ == "__main__":
    run_service("telemetry", TelemetrySettings, create_service)
