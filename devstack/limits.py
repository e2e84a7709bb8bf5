"""Rate limits raised out of the way, for meshes whose traffic all comes from one client
network (the end-to-end tests, the bench, the rollout drill): every route of the limits file
the quota service reads, per IP and per user, plus the default and the admin-failure limit."""

from __future__ import annotations

import os
from pathlib import Path

from services.quota.ratelimit.config import DEFAULT_CONFIG, Scope, load_config

RAISED_LIMIT = "1000000/second"


def raised_limits_env(limit: str = RAISED_LIMIT) -> dict[str, str]:
    """RATE_LIMIT_<ROUTE>_PER_IP / _PER_USER = `limit` for every route of the limits file (and
    the default), and RATE_LIMIT_ADMIN_FAILURES_PER_IP, so no request is ever refused."""
    config = load_config(Path(os.environ.get("RATE_LIMIT_CONFIG") or DEFAULT_CONFIG))
    names = [route.name for route in config.routes] + ["default"]
    return {
        f"RATE_LIMIT_{name.upper()}_PER_{scope.value.upper()}": limit
        for name in names
        for scope in Scope
    } | {"RATE_LIMIT_ADMIN_FAILURES_PER_IP": limit}
