"""Test support shared by the tests, the fuzzers and the benchmarks (in the repository, not in the
wheel): :mod:`fedmerge_testing.hostile`, the hostile-input corpus."""
