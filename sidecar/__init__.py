"""meshfed sidecar: the per-workload trio proxy."""
