"""The adapter registry: names, the local adapter store, manifests and validation."""
