"""Paper experiments from the shell: grids of runs, their tables and figures (`python -m experiments`)."""
