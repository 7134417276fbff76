"""registry_hooks: a signed-webhook receiver that turns MLflow registry events into skinreg work."""
