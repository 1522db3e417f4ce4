"""Builders and data of gradwatch's built-in samples (installed as gradwatch.sample_runs)."""
