"""`make rollout-drill`: find or start PostgreSQL and Redis (as `make run` does), run the drill
on a scratch database and Redis prefix of its own (dropped afterwards), print the report. Exits
0 when no request failed and every replacement went as a rolling update's does, 1 otherwise.
ROLLOUT_RATE (40 requests/s), ROLLOUT_WORKERS (16 connections) and ROLLOUT_BASELINE_SECONDS
(15) shape the load. ROLLOUT_RUNTIME=auto|containers|processes: the service replicas as Podman
containers of the genmesh/<service> images (built first if missing) or as processes; auto
(the default) takes containers when Podman is usable and the images are present or build."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

from devstack import infra
from devstack.mesh import REPO
from devstack.rollout.drill import DrillConfig, run_drill, scratch_data

SCRATCH = REPO / ".run"


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM and SIGHUP (the terminal closing) stop the drill as Ctrl-C does: every process it
    # started is stopped on the way out (and dies with it in any case: die_with_parent).
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    started: list[infra.Server] = []
    try:
        pg = infra.postgres(SCRATCH / "data")
        started.append(pg)
        rd = infra.redis(SCRATCH / "data")
        if rd is None:
            print("WARNING: no Redis: each replica caches and counts in its own memory")
        else:
            started.append(rd)
        redis_url = rd.url if rd else ""
        with scratch_data(pg.url, redis_url) as (database_url, prefix):
            config = DrillConfig(
                database_url=database_url,
                redis_url=redis_url,
                redis_prefix=prefix,
                log_dir=SCRATCH / "logs" / f"rollout-{prefix.split('-')[-1].rstrip(':')}",
                rate=float(os.environ.get("ROLLOUT_RATE", "40")),
                workers=int(os.environ.get("ROLLOUT_WORKERS", "16")),
                baseline_seconds=float(os.environ.get("ROLLOUT_BASELINE_SECONDS", "15")),
                runtime=os.environ.get("ROLLOUT_RUNTIME", "auto"),
            )
            report = run_drill(config)
        print()
        print(report.render(), flush=True)
        return 0 if report.passed else 1
    except infra.InfraError as err:
        print(f"\nERROR: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: every process the drill started is stopped", file=sys.stderr)
        return 130
    finally:
        for server in reversed(started):
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
