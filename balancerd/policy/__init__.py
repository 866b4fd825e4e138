"""Policy documents: model (frozen values) and load (YAML -> validated Policy)."""
