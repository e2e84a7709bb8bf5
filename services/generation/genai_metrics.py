"""GenAI client metrics of the upstream chat-completions calls, exported to Prometheus.

The metric names follow the GenAI client metrics of the OpenTelemetry semantic conventions v1.x
(open-telemetry/semantic-conventions v1.41.0, docs/gen-ai/gen-ai-metrics.md): the names the
OpenTelemetry GenAI instrumentation libraries emit and dashboards expect. They do NOT follow
open-telemetry/semantic-conventions-genai v0.1.0, which renamed them
(`gen_ai.client.inference.*`); none of those names is emitted.

Names are what OpenTelemetry's Prometheus compatibility rules give: dots become underscores,
the unit `s` adds `_seconds`, the annotation `{token}` adds nothing.
An attribute that does not apply is the empty label value (Prometheus treats it as absent).

- gen_ai.client.operation.duration (histogram, s): gen_ai_client_operation_duration_seconds,
  with `error_type` (empty when the operation succeeded);
- gen_ai.client.token.usage (histogram, {token}): gen_ai_client_token_usage, by
  `gen_ai_token_type` (`input` or `output`): one observation of each per operation whose
  response reported its usage; never for a failed operation, never a made-up 0;
- gen_ai.client.operation.time_to_first_chunk (histogram, s):
  gen_ai_client_operation_time_to_first_chunk_seconds, for streaming calls only.

All carry gen_ai_operation_name, gen_ai_provider_name, gen_ai_request_model,
gen_ai_response_model, server_address and server_port, and use the conventions'
ExplicitBucketBoundaries.

Each call recorded is ONE attempt at the upstream (our retry loop makes several calls).

`error.type` values reported (the convention asks instrumentations to list them):
- `timeout`: the upstream did not answer in time (the SDK's timeout, or a read timeout
  between stream chunks);
- an HTTP status, e.g. `429`, `500`: the upstream answered with an error status;
- `APIConnectionError`: the upstream could not be reached, or the connection dropped;
- `cancelled`: our caller gave up before the answer was complete (its deadline passed, or its
  client went away): not the upstream's fault, but the operation did not complete;
- another exception class name (e.g. `APIResponseValidationError`): an unusable answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Histogram

OPERATION_CHAT = "chat"
PROVIDER_OPENAI = "openai"
ERROR_TIMEOUT = "timeout"
ERROR_CANCELLED = "cancelled"
# gen_ai.token.type values.
USAGE_INPUT = "input"
USAGE_OUTPUT = "output"

# The conventions' ExplicitBucketBoundaries.
DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip

# The attributes every instrument here carries.
COMMON_LABELS = (
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
    "server_address",
    "server_port",
)

OPERATION_DURATION = Histogram(
    "gen_ai_client_operation_duration_seconds",
    "GenAI operation duration (gen_ai.client.operation.duration).",
    [*COMMON_LABELS, "error_type"],
    buckets=DURATION_BUCKETS,
)
TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Number of input and output tokens used (gen_ai.client.token.usage).",
    [*COMMON_LABELS, "gen_ai_token_type"],
    buckets=TOKEN_BUCKETS,
)
TIME_TO_FIRST_CHUNK = Histogram(
    "gen_ai_client_operation_time_to_first_chunk_seconds",
    "Time from issuing a streaming request to its first content chunk "
    "(gen_ai.client.operation.time_to_first_chunk).",
    COMMON_LABELS,
    buckets=DURATION_BUCKETS,
)


@dataclass(frozen=True)
class OperationLabels:
    """What is known of a call before it is made: the attributes its metrics share."""

    request_model: str
    server_address: str
    server_port: int | None
    operation: str = OPERATION_CHAT
    provider: str = PROVIDER_OPENAI

    def values(self, response_model: str | None) -> dict[str, str]:
        return {
            "gen_ai_operation_name": self.operation,
            "gen_ai_provider_name": self.provider,
            "gen_ai_request_model": self.request_model,
            "gen_ai_response_model": response_model or "",
            "server_address": self.server_address,
            "server_port": "" if self.server_port is None else str(self.server_port),
        }


@dataclass(frozen=True)
class TokenUsage:
    """The tokens an operation used, as its response reported them."""

    input_tokens: int
    output_tokens: int


def record_time_to_first_chunk(
    labels: OperationLabels, response_model: str | None, seconds: float
) -> None:
    """A streaming call's first content chunk arrived `seconds` after the request was issued.
    Never recorded for unary calls."""
    TIME_TO_FIRST_CHUNK.labels(**labels.values(response_model)).observe(seconds)


def record_operation(
    labels: OperationLabels,
    *,
    response_model: str | None,
    seconds: float,
    usage: TokenUsage | None,
    error_type: str | None = None,
) -> None:
    """One finished operation (one attempt). Its duration is always recorded, with
    `error_type` if it failed. Its token usage only if it succeeded and its response reported
    usage (`usage` not None): a failed operation records none, even if usage had arrived."""
    values = labels.values(response_model)
    OPERATION_DURATION.labels(**values, error_type=error_type or "").observe(seconds)
    if usage is None or error_type is not None:
        return
    TOKEN_USAGE.labels(**values, gen_ai_token_type=USAGE_INPUT).observe(usage.input_tokens)
    TOKEN_USAGE.labels(**values, gen_ai_token_type=USAGE_OUTPUT).observe(usage.output_tokens)
