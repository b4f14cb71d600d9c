"""Fakes of external services for tests and benchmarks (real clients, fake servers)."""
