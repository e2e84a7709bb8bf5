"""The mixed traffic of `make soak`: four streams, each its own wrk process with its own
connections, so each has its own rate, errors and latency:

- cache hits: the same POST /api/generate over and over (its answer cached once at the start);
- cache misses: POST /api/generate with a prompt never sent before (the simulator answers);
- events: POST /api/events, batches of new funnel events (bench/events.py's script);
- feedback: POST /api/feedback, a rating with a comment (a row each).

Each connection waits a delay after every answer (wrk's `delay()`), so a stream sends about
connections / (latency + delay) requests a second; `Pacer` sets the delays that reach a target
rate and corrects them from what each period achieved.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import events, wrk

# Share of the total rate each stream sends, and its connections.
SHARES = {"hits": 0.70, "misses": 0.10, "events": 0.10, "feedback": 0.10}
CONNECTIONS = {"hits": 16, "misses": 4, "events": 4, "feedback": 4}

_MISS_LUA = """\
local prefix = "{prefix}"
local threads = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function init(args)
  counter = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local body = string.format(
    '{{"text":"soak %s %d %d: name a colour","lang":"en"}}', prefix, tid, counter)
  return wrk.format(nil, nil, nil, body)
end
"""


@dataclass(frozen=True)
class Stream:
    name: str
    path: str
    connections: int
    # The wrk script without pacing; `prefix` makes its prompts / event ids new per period.
    script: Callable[[str], str]


def streams(hit_text: str) -> list[Stream]:
    hit = json.dumps({"text": hit_text, "lang": "en"})
    feedback = json.dumps({"rating": 4, "comment": "soak"})
    scripts: dict[str, tuple[str, Callable[[str], str]]] = {
        "hits": ("/api/generate", lambda _prefix: wrk.post_json_script(hit)),
        "misses": ("/api/generate", lambda prefix: _MISS_LUA.format(prefix=prefix)),
        "events": ("/api/events", events.lua_script),
        "feedback": ("/api/feedback", lambda _prefix: wrk.post_json_script(feedback)),
    }
    return [
        Stream(name, path, CONNECTIONS[name], script) for name, (path, script) in scripts.items()
    ]


def write_script(stream: Stream, workdir: Path, delay_ms: float) -> Path:
    """The stream's script for one period, with fresh ids (an 8-hex-digit prefix, as the
    events script needs) and the pacing delay."""
    prefix = uuid.uuid4().hex[:8]
    path = workdir / f"soak-{stream.name}-{prefix}.lua"
    path.write_text(stream.script(prefix) + wrk.paced(delay_ms))
    return path


class Pacer:
    """The delay per connection that makes a stream send `target` requests a second: a
    connection's period is latency + delay, so delay = connections / target - latency. The
    latency starts at 0 (the first period sends a little less than the target, never more) and
    is then estimated from each period (connections / achieved - delay used), averaged with
    the previous estimate so that one disturbed period does not swing the next."""

    def __init__(self, connections: int, target: float) -> None:
        self.connections = connections
        self.target = target
        self.latency_ms = 0.0
        self._observed = False

    @property
    def delay_ms(self) -> float:
        return max(0.0, self.connections / self.target * 1000 - self.latency_ms)

    def observe(self, achieved: float, delay_used_ms: float) -> None:
        if achieved <= 0:
            return
        latest = max(0.0, self.connections / achieved * 1000 - delay_used_ms)
        self.latency_ms = (self.latency_ms + latest) / 2 if self._observed else latest
        self._observed = True
