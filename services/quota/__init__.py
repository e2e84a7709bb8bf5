"""The quota service: daily generation quotas (guests by client IP in Redis, free and pro users
by profile in PostgreSQL), reset at midnight in a configured zone, and user profiles."""
