"""Performance benchmarks: one command each (`python -m benchmarks.<name>`), printing a table."""
