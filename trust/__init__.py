"""meshfed trust: SPIFFE IDs, per-cluster CAs, X.509-SVIDs, bundles, rotation, revocation."""
