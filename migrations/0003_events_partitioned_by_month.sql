-- funnel_events and security_events become tables partitioned by month of created_at
-- (declarative RANGE partitioning), so retention drops whole months instead of deleting rows.
-- The telemetry service's retention job (services/telemetry/retention.py) keeps partitions
-- created ahead and drops those past EVENTS_RETENTION_DAYS; this migration moves the existing
-- rows and creates the partitions they need, from the oldest month held through two months
-- ahead. All of it runs in the one transaction of this migration.
--
-- Partitions are named <table>_pYYYY_MM and cover [first of the month, first of the next)
-- in UTC. There is no DEFAULT partition: with one, adding a month must scan it and fails if it
-- holds rows of that month. Rows are written with created_at = now(), so only the current
-- month is ever written to, and the job keeps the next months ready.
--
-- A unique constraint on a partitioned table must contain the partition key, so funnel_events
-- can no longer be unique on event_id alone. The uniqueness of the client's event id, across
-- every month, moves to funnel_event_ids: one row per stored event with the same created_at,
-- written in the same statement as the event, and pruned by the retention job only below the
-- oldest month still stored. An event whose id is there is a duplicate, whatever month a retry
-- lands in.

ALTER TABLE funnel_events RENAME TO funnel_events_unpartitioned;
ALTER TABLE security_events RENAME TO security_events_unpartitioned;

-- The same columns, in the same order, with the same defaults and checks as 0001 (the checks
-- under the names PostgreSQL gave them there, now taken by the renamed tables, hence explicit);
-- the keys and indexes come after the rows are in.
CREATE TABLE funnel_events (
    event_id     uuid NOT NULL,  -- the client's id: unique through funnel_event_ids
    user_id      text,
    session_id   text NOT NULL DEFAULT ''
                 CONSTRAINT funnel_events_session_id_check CHECK (length(session_id) <= 128),
    event        text NOT NULL
                 CONSTRAINT funnel_events_event_check CHECK (length(event) BETWEEN 1 AND 64),
    source       text NOT NULL DEFAULT ''
                 CONSTRAINT funnel_events_source_check CHECK (length(source) <= 64),
    lang         text NOT NULL DEFAULT ''
                 CONSTRAINT funnel_events_lang_check CHECK (length(lang) <= 35),
    properties   jsonb NOT NULL DEFAULT '{}'::jsonb,
    client_ip    text,
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    created_at   timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (created_at);

CREATE TABLE security_events (
    id          uuid NOT NULL DEFAULT gen_random_uuid(),
    event_type  text NOT NULL
                CONSTRAINT security_events_event_type_check
                CHECK (length(event_type) BETWEEN 1 AND 64),
    severity    text NOT NULL
                CONSTRAINT security_events_severity_check
                CHECK (severity IN ('low', 'medium', 'high', 'critical')),
    user_id     text,
    ip          text,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (created_at);

-- Every stored funnel event's id, not partitioned, so an id is unique across all months.
CREATE TABLE funnel_event_ids (
    event_id    uuid PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()  -- equal to its event's created_at
);
-- The retention job prunes by age.
CREATE INDEX funnel_event_ids_created_at_idx ON funnel_event_ids (created_at);

-- One partition per month from the oldest row (or this month) through two months ahead of the
-- newest row (or of this month).
DO $$
DECLARE
    parent      text;
    month_from  timestamp;  -- UTC wall time of the first of a month
    month_last  timestamp;
BEGIN
    FOREACH parent IN ARRAY ARRAY['funnel_events', 'security_events'] LOOP
        EXECUTE format(
            'SELECT date_trunc(''month'', least(min(created_at), now()) AT TIME ZONE ''UTC''),
                    date_trunc(''month'', greatest(max(created_at), now()) AT TIME ZONE ''UTC'')
                        + interval ''2 months''
             FROM %I', parent || '_unpartitioned')
        INTO month_from, month_last;
        WHILE month_from <= month_last LOOP
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                parent || to_char(month_from, '"_p"YYYY"_"MM'),
                parent,
                to_char(month_from, 'YYYY-MM-DD') || ' 00:00:00+00',
                to_char(month_from + interval '1 month', 'YYYY-MM-DD') || ' 00:00:00+00');
            month_from := month_from + interval '1 month';
        END LOOP;
    END LOOP;
END
$$;

INSERT INTO funnel_events
    (event_id, user_id, session_id, event, source, lang, properties, client_ip, occurred_at,
     created_at)
SELECT event_id, user_id, session_id, event, source, lang, properties, client_ip, occurred_at,
       created_at
FROM funnel_events_unpartitioned;

INSERT INTO funnel_event_ids (event_id, created_at)
SELECT event_id, created_at FROM funnel_events_unpartitioned;

INSERT INTO security_events (id, event_type, severity, user_id, ip, details, created_at)
SELECT id, event_type, severity, user_id, ip, details, created_at
FROM security_events_unpartitioned;

DROP TABLE funnel_events_unpartitioned;
DROP TABLE security_events_unpartitioned;

-- Keys and indexes on the parents (each partition gets its own, now and when created later),
-- under the names of 0001.
ALTER TABLE funnel_events ADD CONSTRAINT funnel_events_pkey PRIMARY KEY (event_id, created_at);
CREATE INDEX funnel_events_user_id_idx ON funnel_events (user_id);
CREATE INDEX funnel_events_session_id_idx ON funnel_events (session_id);
CREATE INDEX funnel_events_event_idx ON funnel_events (event);
CREATE INDEX funnel_events_created_at_idx ON funnel_events (created_at);
CREATE INDEX funnel_events_lang_idx ON funnel_events (lang);
CREATE INDEX funnel_events_source_idx ON funnel_events (source);

ALTER TABLE security_events ADD CONSTRAINT security_events_pkey PRIMARY KEY (id, created_at);
CREATE INDEX security_events_event_type_idx ON security_events (event_type);
CREATE INDEX security_events_severity_idx ON security_events (severity);
CREATE INDEX security_events_user_id_idx ON security_events (user_id);
CREATE INDEX security_events_ip_idx ON security_events (ip);
CREATE INDEX security_events_created_at_idx ON security_events (created_at);

-- Adds one month to a partitioned table, for the retention job: an empty table shaped like
-- the parent, then attached (ATTACH takes a weaker lock than CREATE ... PARTITION OF, so
-- readers and writers of the parent are not blocked). Names and bounds go through format()'s
-- %I and %L, so the job passes them as bind parameters and no SQL is built from strings.
CREATE FUNCTION genmesh_attach_month_partition(
    parent text, part text, month_start timestamptz, month_end timestamptz
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format(
        'CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part, parent);
    EXECUTE format(
        'ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
        parent, part, month_start, month_end);
END
$$;
