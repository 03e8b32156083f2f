"""meshfed chaos: fault injectors and failover drills."""
