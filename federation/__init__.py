"""meshfed federation: mesh model, deployment config, store, agent, catalog stream, CLI."""
