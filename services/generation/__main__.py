"""`python -m services.generation`: serve until SIGTERM/SIGINT, then stop gracefully."""

from services.common.server import run_service
from services.generation.app import create_service
from services.generation.settings import GenerationSettings

if __name__ == "__main__":
    run_service("generation", GenerationSettings, create_service)
