"""`nanfuse demo`: a NaN-prone training run, kept alive by nanfuse (see run.py)."""
