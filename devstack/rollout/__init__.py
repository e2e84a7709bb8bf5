"""`make rollout-drill`: two replicas of each service and two Envoys, as processes, under steady
REST load, each replaced one at a time as a Kubernetes rolling update replaces pods; prints the
failed requests (the goal is none) and the latency of each phase against the baseline. See
deploy/k8s/README.md, "Rollout drill"; tests/e2e/test_rollout.py runs a short version."""

from devstack.rollout.drill import DrillConfig, Report, run_drill

__all__ = ["DrillConfig", "Report", "run_drill"]
