"""`python -m services.quota`: serve until SIGTERM/SIGINT, then stop gracefully."""

from services.common.server import run_service
from services.quota.app import create_service
from services.quota.settings import QuotaSettings

if __name__ == "__main__":
    run_service("quota", QuotaSettings, create_service)
