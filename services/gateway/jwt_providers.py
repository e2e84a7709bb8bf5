"""The jwt_authn providers: which keys verify user tokens and what a token must say.

Keys come from settings: Supabase's HS256 secret (an `oct` key in an inline JWKS), asymmetric
keys from a JWKS URL (fetched and cached by Envoy, through the `jwks` cluster) or from a JWKS
file. Several may be set at once (a project moving from the shared secret to asymmetric keys
accepts both while tokens of either kind are alive); a token passes if one provider verifies
it. Every provider requires the same issuer, audience and expiry.

Without any key, the one provider holds 32 random bytes that nobody knows and that are never
written anywhere else (Envoy refuses an empty JWKS): no token verifies, every bearer token gets
401, and requests without one stay guests.
"""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any
from urllib.parse import urlsplit

from services.gateway.settings import GatewaySettings

USER_ID_HEADER = "x-genmesh-user-id"
USER_EMAIL_HEADER = "x-genmesh-user-email"
USER_ROLE_HEADER = "x-genmesh-user-role"
JWKS_CLUSTER = "jwks"
HS256_PROVIDER = "supabase_hs256"
JWKS_PROVIDER = "jwks"
TYPE_URL = "type.googleapis.com"


def hs256_jwks(secret: str) -> str:
    """The local JWKS for an HS256 secret: one `oct` key, base64url without padding.

    Supabase (like most JWT libraries) uses the secret string's UTF-8 bytes as the HMAC key;
    an empty secret becomes a random key (see the module docstring)."""
    key = secret.encode() if secret else secrets.token_bytes(32)
    k = base64.urlsafe_b64encode(key).rstrip(b"=").decode()
    return json.dumps({"keys": [{"kty": "oct", "alg": "HS256", "k": k}]})


def _common(settings: GatewaySettings) -> dict[str, Any]:
    return {
        "issuer": settings.issuer,
        "audiences": settings.audiences,
        # A token without exp would never expire.
        "require_expiration": True,
        "clock_skew_seconds": 30,
        # Only the Authorization header: the default access_token query parameter would put
        # tokens into URLs and logs.
        "from_headers": [{"name": "Authorization", "value_prefix": "Bearer "}],
        # The services need the claims below, not the token.
        "forward": False,
        # jwt_authn strips client-sent copies of these headers itself. They must not also be
        # in a route's request_headers_to_remove: that runs later, in the router, and would
        # delete the verified values.
        "claim_to_headers": [
            {"header_name": USER_ID_HEADER, "claim_name": "sub"},
            {"header_name": USER_EMAIL_HEADER, "claim_name": "email"},
            {"header_name": USER_ROLE_HEADER, "claim_name": settings.admin_role_claim},
        ],
    }


def providers(settings: GatewaySettings) -> dict[str, dict[str, Any]]:
    """jwt_authn's `providers`, by name."""
    found: dict[str, dict[str, Any]] = {}
    secret = settings.supabase_jwt_secret.get_secret_value()
    if secret or not settings.has_keys:
        found[HS256_PROVIDER] = {
            **_common(settings),
            "local_jwks": {"inline_string": hs256_jwks(secret)},
        }
    if settings.jwks_url:
        found[JWKS_PROVIDER] = {
            **_common(settings),
            "remote_jwks": {
                "http_uri": {"uri": settings.jwks_url, "cluster": JWKS_CLUSTER, "timeout": "5s"},
                "cache_duration": f"{settings.jwks_cache_seconds}s",
                # Fetched at start (the listener does not wait for it) and again on expiry;
                # a failed fetch is retried every second, not on the next request.
                "async_fetch": {"failed_refetch_duration": "1s"},
                "retry_policy": {
                    "num_retries": 3,
                    "retry_back_off": {"base_interval": "0.2s", "max_interval": "2s"},
                },
            },
        }
    elif settings.jwks_file:
        found[JWKS_PROVIDER] = {
            **_common(settings),
            "local_jwks": {"filename": settings.jwks_file},
        }
    return found


def requirement(names: list[str]) -> dict[str, Any]:
    """A token, if present, must pass one provider; no token at all is a guest."""
    return {
        "requires_any": {
            "requirements": [*({"provider_name": name} for name in names), {"allow_missing": {}}]
        }
    }


def jwks_clusters(settings: GatewaySettings) -> list[dict[str, Any]]:
    """The cluster Envoy fetches a remote JWKS through (none without GATEWAY_JWKS_URL)."""
    if not settings.jwks_url:
        return []
    url = urlsplit(settings.jwks_url)
    tls = url.scheme == "https"
    host = url.hostname or ""
    cluster: dict[str, Any] = {
        "name": JWKS_CLUSTER,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": JWKS_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": host,
                                        "port_value": url.port or (443 if tls else 80),
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": f"{TYPE_URL}/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": settings.jwks_ca_file},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": host}}
                        ],
                    }
                },
            },
        }
    return [cluster]
