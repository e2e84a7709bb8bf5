-- genmesh schema: the tables and indexes of the product spec, with keys and constraints.

CREATE EXTENSION IF NOT EXISTS pgcrypto;

-- Signed-in users. Free and pro quotas are counted here; guests are counted in Redis.
CREATE TABLE IF NOT EXISTS profiles (
    user_id          text PRIMARY KEY CHECK (length(user_id) BETWEEN 1 AND 128),
    email            text CHECK (email IS NULL OR length(email) <= 320),
    is_pro           boolean NOT NULL DEFAULT false,
    daily_used       integer NOT NULL DEFAULT 0 CHECK (daily_used >= 0),
    last_reset_time  timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS profiles_is_pro_idx ON profiles (is_pro);
CREATE INDEX IF NOT EXISTS profiles_email_idx ON profiles (email);
CREATE INDEX IF NOT EXISTS profiles_last_reset_time_idx ON profiles (last_reset_time);

-- One row per quota reservation of a signed-in user, so a refund happens at most once.
CREATE TABLE IF NOT EXISTS quota_reservations (
    reservation_id  uuid PRIMARY KEY,
    user_id         text NOT NULL REFERENCES profiles (user_id) ON DELETE CASCADE,
    quota_day       date NOT NULL,
    state           text NOT NULL DEFAULT 'reserved'
                    CHECK (state IN ('reserved', 'committed', 'refunded')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    settled_at      timestamptz
);
CREATE INDEX IF NOT EXISTS quota_reservations_user_id_idx ON quota_reservations (user_id);
CREATE INDEX IF NOT EXISTS quota_reservations_created_at_idx ON quota_reservations (created_at);

CREATE TABLE IF NOT EXISTS pro_wishlist (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     text,
    email       text NOT NULL CHECK (length(email) BETWEEN 3 AND 320),
    lang        text NOT NULL DEFAULT '' CHECK (length(lang) <= 35),
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- Idempotent per email, whatever its case.
CREATE UNIQUE INDEX IF NOT EXISTS pro_wishlist_email_key ON pro_wishlist (lower(email));
CREATE INDEX IF NOT EXISTS pro_wishlist_user_id_idx ON pro_wishlist (user_id);
CREATE INDEX IF NOT EXISTS pro_wishlist_email_idx ON pro_wishlist (email);
CREATE INDEX IF NOT EXISTS pro_wishlist_lang_idx ON pro_wishlist (lang);
CREATE INDEX IF NOT EXISTS pro_wishlist_created_at_idx ON pro_wishlist (created_at);

CREATE TABLE IF NOT EXISTS feedback (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id        text,
    client_ip      text,
    generation_id  text CHECK (generation_id IS NULL OR length(generation_id) <= 64),
    rating         smallint NOT NULL CHECK (rating BETWEEN 1 AND 5),
    comment        text NOT NULL DEFAULT '' CHECK (length(comment) <= 2000),
    lang           text NOT NULL DEFAULT '' CHECK (length(lang) <= 35),
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS feedback_user_id_idx ON feedback (user_id);
CREATE INDEX IF NOT EXISTS feedback_created_at_idx ON feedback (created_at);
CREATE INDEX IF NOT EXISTS feedback_rating_idx ON feedback (rating);
CREATE INDEX IF NOT EXISTS feedback_lang_idx ON feedback (lang);

CREATE TABLE IF NOT EXISTS funnel_events (
    event_id     uuid PRIMARY KEY,  -- the client's id: a retried event is stored once
    user_id      text,
    session_id   text NOT NULL DEFAULT '' CHECK (length(session_id) <= 128),
    event        text NOT NULL CHECK (length(event) BETWEEN 1 AND 64),
    source       text NOT NULL DEFAULT '' CHECK (length(source) <= 64),
    lang         text NOT NULL DEFAULT '' CHECK (length(lang) <= 35),
    properties   jsonb NOT NULL DEFAULT '{}'::jsonb,
    client_ip    text,
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS funnel_events_user_id_idx ON funnel_events (user_id);
CREATE INDEX IF NOT EXISTS funnel_events_session_id_idx ON funnel_events (session_id);
CREATE INDEX IF NOT EXISTS funnel_events_event_idx ON funnel_events (event);
CREATE INDEX IF NOT EXISTS funnel_events_created_at_idx ON funnel_events (created_at);
CREATE INDEX IF NOT EXISTS funnel_events_lang_idx ON funnel_events (lang);
CREATE INDEX IF NOT EXISTS funnel_events_source_idx ON funnel_events (source);

CREATE TABLE IF NOT EXISTS security_events (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    event_type  text NOT NULL CHECK (length(event_type) BETWEEN 1 AND 64),
    severity    text NOT NULL CHECK (severity IN ('low', 'medium', 'high', 'critical')),
    user_id     text,
    ip          text,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS security_events_event_type_idx ON security_events (event_type);
CREATE INDEX IF NOT EXISTS security_events_severity_idx ON security_events (severity);
CREATE INDEX IF NOT EXISTS security_events_user_id_idx ON security_events (user_id);
CREATE INDEX IF NOT EXISTS security_events_ip_idx ON security_events (ip);
CREATE INDEX IF NOT EXISTS security_events_created_at_idx ON security_events (created_at);
