"""Local development stack: finds or starts PostgreSQL and Redis, and runs the whole mesh
(simulator, services, Envoy) as child processes. Used by `make run` and by the tests; never
deployed."""
