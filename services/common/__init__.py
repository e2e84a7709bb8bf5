"""Code every genmesh service shares: settings, logging, tracing, metrics, errors, the server
bootstrap, and resilient PostgreSQL and Redis clients. It knows no service and imports none."""
