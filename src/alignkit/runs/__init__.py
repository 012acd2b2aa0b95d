"""A run's directory and what is written into it: ``rundir`` (claiming, locking, status, resume, the
directories a run must never use), ``reports`` (report.md: measures before and after) and ``plots``."""
