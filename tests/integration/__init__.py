"""The integration tier: tests on real PostgreSQL, Redis and the Kafka-protocol broker,
and tests that run role or CLI processes.

The server fixtures come from ``tests.support.servers`` (see this package's conftest). Its
modules import only the package under test and the harness in ``tests.support``.
"""
