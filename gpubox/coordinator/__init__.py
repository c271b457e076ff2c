"""The coordinator: HTTP API for people and CI, broker for workers, one store."""
