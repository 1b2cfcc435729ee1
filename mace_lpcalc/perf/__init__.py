"""The measurement floor: benchmarks, per-block profiles, set-up time, sentinel overhead and the long-run load test, all timed by :mod:`.timing`."""
