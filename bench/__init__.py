"""Benchmark of the wrapper against direct access, nginx and minimal pass-throughs (`make bench`)."""
