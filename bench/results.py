"""The results of a run as JSON under bench/results/ (or BENCH_RESULTS_DIR): a timestamped
file and latest.json, both the same document. Results are not committed, except a run that
backs a claim in the README (bench/results/README.md says how)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.gateway.render import envoy_binary


def _envoy_version() -> str:
    try:
        done = subprocess.run(
            [envoy_binary(), "--version"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    words = done.stdout.split()
    return next((w for w in words if "/" in w and w[0].isalnum()), done.stdout.strip()[:80])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "envoy": _envoy_version(),
        "wrk": shutil.which("wrk"),
    }


def stamp(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def write(results_dir: Path, name: str, document: dict[str, Any]) -> Path:
    """<results_dir>/<name>.json and <results_dir>/latest.json (or latest-soak.json for a
    soak: `name` ends in -soak); returns the timestamped file."""
    results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, sort_keys=False, default=str) + "\n"
    path = results_dir / f"{name}.json"
    path.write_text(text)
    latest = "latest-soak.json" if name.endswith("-soak") else "latest.json"
    (results_dir / latest).write_text(text)
    return path
