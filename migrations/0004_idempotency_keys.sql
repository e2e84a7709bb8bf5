-- Client idempotency keys (the `Idempotency-Key` header of draft-ietf-httpapi-idempotency-key-
-- header) for feedback and the wishlist: a retried request is stored once and answered as the
-- first time. One row per key, scoped to the caller and the route:
--   route        the RPC ('SubmitFeedback', 'JoinWishlist');
--   scope        'user:<user id>', or 'guest:<client network>' for guests (the IPv4 address,
--                the IPv6 /64);
--   fingerprint  SHA-256 of the first request's canonical JSON: a retry with another body is
--                refused, not answered;
--   response     what the first request was answered ({"feedback_id": ...}, {"created": ...}),
--                written in the same transaction as the rows it describes.
-- A key is claimed with INSERT ... ON CONFLICT in the transaction that writes the request's
-- rows, so a concurrent retry waits for the first and then reads its answer. Keys expire after
-- the telemetry service's idempotency window (24 h): an expired key is claimed afresh by the
-- next request that sends it, and expired rows are deleted by the service (created_at index).
-- Independent of 0003: only this new table.

CREATE TABLE IF NOT EXISTS idempotency_keys (
    route            text NOT NULL CHECK (length(route) BETWEEN 1 AND 64),
    scope            text NOT NULL CHECK (length(scope) BETWEEN 1 AND 200),
    idempotency_key  text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    fingerprint      bytea NOT NULL CHECK (length(fingerprint) = 32),
    response         jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (route, scope, idempotency_key)
);

-- Pruning expired keys, oldest first.
CREATE INDEX IF NOT EXISTS idempotency_keys_created_at_idx ON idempotency_keys (created_at);
