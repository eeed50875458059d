"""Frozen features: one extraction path, its cache, the engine that runs it, and features files."""
