"""Machinery with no business rules: runtime, config, adapters, dev stack."""
