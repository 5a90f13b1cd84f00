"""eventsched benchmarks: one script per target of issue #6 (see bench/README.md)."""
