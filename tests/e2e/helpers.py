"""Reading the gateway's JSON error bodies."""

from __future__ import annotations

from typing import Any

import httpx


def error_details(response: httpx.Response) -> list[dict[str, Any]]:
    body = response.json()
    details: list[dict[str, Any]] = body.get("details", [])
    return details


def detail_of(response: httpx.Response, type_suffix: str) -> dict[str, Any]:
    for detail in error_details(response):
        if str(detail.get("@type", "")).endswith(type_suffix):
            return detail
    raise AssertionError(f"no {type_suffix} in {response.text}")


def violated_fields(response: httpx.Response) -> set[str]:
    bad = detail_of(response, "google.rpc.BadRequest")
    violations = bad.get("field_violations", bad.get("fieldViolations", []))
    return {v["field"] for v in violations}


def reason(response: httpx.Response) -> str:
    return str(detail_of(response, "google.rpc.ErrorInfo")["reason"])
