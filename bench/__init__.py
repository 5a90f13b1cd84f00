"""eventsched benchmarks: one script per target of issue #6 (see bench/README.md).

Every benchmark script (``python -m bench.<name>``) follows the same shape::

    args = parse_args(...)                    # bench.run: --quick, --out-dir, --profile, ...
    run = BenchRun("lateness", args)           # waits for a quiet machine (full runs)
    with Stack(run) as stack:                  # bench.stack: embedded servers, migrated
        role = stack.role("executor", settings)  # `python -m eventsched run --role ...`
        ...                                    # feeders, Sampler, Profiler
    run.finish(results, table, plot)           # JSON, RESULTS.md, PNG

The harness modules may import eventsched and ``tests.support`` (what the benchmarks share
with the test suite is defined there once); ``stock_saq`` imports nothing from eventsched.
"""
