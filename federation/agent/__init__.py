"""The per-cluster federation agent: publishes its cluster, imports the others.

See docs/agent.md.
"""
