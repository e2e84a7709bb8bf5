"""OpenAI-compatible simulator for development and tests (never deployed).

Run `python -m simulator`, then point the SDK at it: OPENAI_BASE_URL=http://127.0.0.1:8900/v1,
and OPENAI_API_KEY=<that key> if SIM_API_KEY is set (`make run` sets it and gives generation
the same key). The control plane (/_sim/faults, /_sim/stats, /_sim/reset) needs no key.
"""

from simulator.app import create_app, start
from simulator.settings import SimSettings

__all__ = ["SimSettings", "create_app", "start"]
