"""The settings only `make bench-litellm` has (the rest are bench/settings.py's BENCH_*)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bench.settings import REPO, SettingError

DEFAULT_BINARY = REPO / ".venv-litellm" / "bin" / "litellm"
_YES = ("", "1", "true", "yes", "on")
_NO = ("0", "false", "no", "off")


@dataclass(frozen=True)
class LitellmSettings:
    # The `litellm` CLI of the venv `make bench-litellm` builds (BENCH_LITELLM_BIN).
    binary: Path
    # Whether genmesh's own cache-hit (`ceiling`) and `miss` sections run in the same run, for
    # the side-by-side table (BENCH_LITELLM_GENMESH, default 1).
    with_genmesh: bool

    @classmethod
    def from_env(cls) -> LitellmSettings:
        raw = os.environ.get("BENCH_LITELLM_GENMESH", "").strip().lower()
        if raw not in _YES + _NO:
            raise SettingError(f"BENCH_LITELLM_GENMESH={raw!r} is neither 1 nor 0")
        binary = os.environ.get("BENCH_LITELLM_BIN", "").strip()
        return cls(binary=Path(binary) if binary else DEFAULT_BINARY, with_genmesh=raw in _YES)
