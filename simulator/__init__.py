"""OpenAI-compatible simulator for development and tests (never deployed).

Run `python -m simulator`, then point the SDK at it: OPENAI_BASE_URL=http://127.0.0.1:8900/v1.
"""

from simulator.app import create_app, start
from simulator.settings import SimSettings

__all__ = ["SimSettings", "create_app", "start"]
