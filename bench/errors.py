"""The error every bench section raises when its figures could not be trusted."""

from __future__ import annotations


class BenchError(RuntimeError):
    """A measurement cannot be trusted (a gateway is not what its label says, a request
    failed, a process is missing); the message says why."""
