"""The test harness shared by the three tiers and bench/: server fixtures, clients, handlers,
helpers.

Test modules, conftests and the benchmarks import from here; nothing here imports a test
module, a conftest or bench/. Modules bench/ uses (clients, metrics, proc, settingsfile,
journal) import no pytest.
"""
