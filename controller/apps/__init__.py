"""App deploys: desired state, health-gated rollouts, rollback."""
