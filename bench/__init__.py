"""benchmark.py's parts: rows (one run's row, the rows' table), jobs (the default jobs' wall clock), scale (1 and 2
processes), plots. benchmark.py imports them; they never import it."""
