"""What the bench's tests share: the mesh's rendered Envoy config, for the bench's copies of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from services.gateway.render import GatewaySettings, render

ECHO_ADDR = "127.0.0.1:50070"
# `make test` builds it (the Makefile's stubs target) before any test runs.
DESCRIPTOR_SET = Path(__file__).resolve().parents[2] / "gen" / "genmesh.pb"


@pytest.fixture
def rendered() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(
        render(GatewaySettings(GATEWAY_DESCRIPTOR_SET=DESCRIPTOR_SET))
    )
    return config
