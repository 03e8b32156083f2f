"""meshfed gateway: the per-cluster east-west gateway."""
