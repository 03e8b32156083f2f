"""Tests of the sidecar's HTTP layer cores (sidecar/http/)."""
