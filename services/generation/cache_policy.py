"""What one request asks of the response cache (GenerateRequest.cache), checked against who
is asking: the key it reads and writes, whether it reads or writes at all, and its tags."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import FieldViolation, invalid_argument
from services.common.identity import Identity


@dataclass(frozen=True)
class CacheOptions:
    """GenerateRequest.cache as plain data; the defaults are an omitted `cache`."""

    no_cache: bool = False
    no_store: bool = False
    per_user: bool = False
    # Already validated by protovalidate: at most 8, unique, lowercase slugs.
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class CachePolicy:
    read: bool
    write: bool
    # "" for the shared cache, else the one caller who may hit the entry.
    owner: str
    # The request's own tags plus, for a per-user entry, "user:<id>" (so an operator can
    # drop one user's entries).
    extra_tags: tuple[str, ...]


def cache_policy(options: CacheOptions, identity: Identity) -> CachePolicy:
    """Raises INVALID_ARGUMENT naming `cache.scope` when a guest asks for a per-user entry:
    a guest is known only by its network, which other people may share."""
    owner = ""
    extra = list(options.tags)
    if options.per_user:
        if identity.is_guest:
            raise invalid_argument(
                FieldViolation(
                    "cache.scope", "CACHE_SCOPE_USER needs a signed-in user (send a token)"
                )
            )
        owner = identity.user_id
        extra.append(f"user:{identity.user_id}")
    return CachePolicy(
        read=not options.no_cache,
        write=not options.no_store,
        owner=owner,
        extra_tags=tuple(dict.fromkeys(extra)),
    )
