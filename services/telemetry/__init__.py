"""The telemetry service: feedback, the pro wishlist, funnel events and security events, stored
durably through group commit, and the system health check behind /api/health."""
