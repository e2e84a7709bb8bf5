"""`make bench-litellm`'s harness (bench/litellm), without LiteLLM: the proxy config it writes
points at the run's simulator and Redis, the proxy gets none of the caller's environment that
would change what is measured, the comparison adds up the right processes, and the pinned
release is the one the requirements name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from bench import ceiling
from bench.litellm import config, proxy, report
from bench.litellm.settings import LitellmSettings
from bench.litellm.stack import model
from bench.misses import upstream_body
from bench.settings import REPO, SettingError

SIMULATOR = "http://127.0.0.1:18900"


def test_the_config_points_at_the_simulator_and_redis(tmp_path: Path) -> None:
    redis = config.RedisTarget.from_url("redis://127.0.0.1:6390/2")
    written = config.write(
        tmp_path / "litellm.yaml", config.proxy_config(model(), SIMULATOR, redis, "ns-1")
    )
    loaded = yaml.safe_load(written.read_text())

    [entry] = loaded["model_list"]
    # The proxy serves the model genmesh asks for, so the same chat completion goes to both.
    assert entry["model_name"] == upstream_body("x")["model"]
    params = entry["litellm_params"]
    assert params["model"] == f"openai/{entry['model_name']}"
    assert params["api_base"] == f"{SIMULATOR}/v1"
    assert params["api_key"] == f"os.environ/{config.SIM_KEY_ENV}"  # no secret in the file
    settings = loaded["litellm_settings"]
    assert settings["cache"] is True
    assert settings["cache_params"] == {
        "type": "redis",
        "host": "127.0.0.1",
        "port": 6390,
        "db": 2,
        "namespace": "ns-1",
        "ttl": config.CACHE_TTL_SECONDS,
    }
    # No master key, no database: nothing to authenticate against or record spend in.
    assert "master_key" not in loaded["general_settings"]
    assert "database_url" not in loaded["general_settings"]


def test_redis_urls_are_read_as_devstack_hands_them_out() -> None:
    assert config.RedisTarget.from_url("redis://127.0.0.1:6379/0") == config.RedisTarget(
        "127.0.0.1", 6379, 0
    )
    assert config.RedisTarget.from_url("redis://:pw@10.0.0.1") == config.RedisTarget(
        "10.0.0.1", 6379, 0, "pw"
    )
    with pytest.raises(ValueError, match="redis://"):
        config.RedisTarget.from_url("rediss://127.0.0.1:6379/0")


def test_the_proxy_gets_none_of_the_callers_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "REDIS_URL", "LITELLM_MASTER_KEY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "from the caller")
    env = proxy.proxy_env("sk-sim-test")
    assert env[config.SIM_KEY_ENV] == "sk-sim-test"
    assert env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"  # no fetch at start-up
    assert not {"DATABASE_URL", "REDIS_URL", "LITELLM_MASTER_KEY", "HTTPS_PROXY"} & set(env)


def test_the_comparison_adds_up_the_processes_on_each_path() -> None:
    genmesh_hit = {
        "rps": 400.0,
        "p50_ms": 70.0,
        "p99_ms": 120.0,
        "non_2xx": 1,
        "socket_errors": 2,
        "cpu_us_per_request": {
            "envoy-bench": 100.0,
            "generation": 1000.0,
            "quota": 500.0,
            "telemetry": 50.0,
            "echo": 7.0,  # idle during the cache-hit rounds: not on the path
            ceiling.WRK: 300.0,
        },
    }
    litellm_hit = {
        **genmesh_hit,
        "rps": 200.0,
        "cpu_us_per_request": {"litellm": 4000.0, ceiling.WRK: 300.0},
    }
    litellm_miss = {
        "added_median_ms": 9.0,
        "added_p99_ms": 20.0,
        "cpu_us_per_pair": {"litellm": 8000.0, "simulator": 900.0},
    }
    rows = report.comparison(
        {"ceiling": {"variants": {ceiling.HIT: genmesh_hit}}},
        {"cache_hit": litellm_hit, "miss": litellm_miss},
    )
    assert rows["cache-hit req/s"] == {report.GENMESH: 400.0, report.LITELLM: 200.0}
    assert rows["cache-hit non-2xx + socket errors"][report.GENMESH] == 3
    assert rows["cache-hit CPU µs per request"] == {report.GENMESH: 1650.0, report.LITELLM: 4000.0}
    assert rows["miss: CPU µs per request"] == {report.GENMESH: None, report.LITELLM: 8000.0}
    assert rows["miss: added median ms"] == {report.GENMESH: None, report.LITELLM: 9.0}


def test_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_LITELLM_BIN", raising=False)
    monkeypatch.setenv("BENCH_LITELLM_GENMESH", "0")
    settings = LitellmSettings.from_env()
    assert not settings.with_genmesh
    assert settings.binary == REPO / ".venv-litellm" / "bin" / "litellm"
    monkeypatch.setenv("BENCH_LITELLM_GENMESH", "maybe")
    with pytest.raises(SettingError, match="BENCH_LITELLM_GENMESH"):
        LitellmSettings.from_env()


def test_the_constraints_pin_the_release_the_requirements_name() -> None:
    folder = REPO / "bench" / "litellm"
    wanted = re.search(
        r"^litellm\[proxy\]==(\S+)$", (folder / "requirements.txt").read_text(), re.MULTILINE
    )
    pinned = re.search(r"^litellm==(\S+)$", (folder / "constraints.txt").read_text(), re.MULTILINE)
    assert wanted is not None
    assert pinned is not None
    assert wanted[1] == pinned[1]
