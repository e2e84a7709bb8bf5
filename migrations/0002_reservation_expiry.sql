-- Signed-in users' reservations expire, and settled ones are pruned
-- (services/quota/reservation_sweeper.py): a reservation whose caller crashed between reserve
-- and settle would otherwise keep its unit used forever, and settled rows would pile up.

-- A new final state, 'expired': the sweeper gave the unit back because no settlement came.
-- 0001 declared the CHECK inline, so PostgreSQL named it quota_reservations_state_check;
-- drop it by that name and re-create it under the same, now explicit, name.
ALTER TABLE quota_reservations DROP CONSTRAINT IF EXISTS quota_reservations_state_check;
ALTER TABLE quota_reservations ADD CONSTRAINT quota_reservations_state_check
    CHECK (state IN ('reserved', 'committed', 'refunded', 'expired'));

-- Finding stale pending rows, oldest first: only pending rows, which stay few.
CREATE INDEX IF NOT EXISTS quota_reservations_pending_created_at_idx
    ON quota_reservations (created_at) WHERE state = 'reserved';

-- Pruning settled rows past their retention, oldest first.
CREATE INDEX IF NOT EXISTS quota_reservations_settled_at_idx
    ON quota_reservations (settled_at) WHERE state <> 'reserved';
