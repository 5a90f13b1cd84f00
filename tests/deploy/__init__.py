"""The deployment tier: compose.yml, the Dockerfile, ops/ (dashboards, Prometheus rules),
the wheel, and a live Prometheus scrape of a running stack.

Its modules import only the package under test and the harness in ``tests.support``.
"""
