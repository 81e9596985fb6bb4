"""Test support shared by the tests, the fuzzers and the benchmarks (in the repository, not in the
wheel): :mod:`fedmerge_testing.hostile`, the hostile-input corpus; :mod:`fedmerge_testing.processes`,
ending the processes a test or a benchmark started."""
