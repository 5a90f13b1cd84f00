"""The test harness shared by the three tiers: server fixtures, clients, handlers, helpers.

Test modules and conftests import from here; nothing here imports a test module or a conftest.
"""
