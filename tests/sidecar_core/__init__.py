"""Tests of the sidecar's pure decision cores: locality, balancer, outlier, health, retry."""
