"""Experiments: one runner (a process per arm, locked folders, reuse of finished arms), foundation, transfer, reports, plots."""
