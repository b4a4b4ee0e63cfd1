"""Fault injection for tests and benchmarks.

A PostgreSQL proxy that pauses, cuts and delays; the chaos workload and its history checker.
"""
