"""nanfuse's benchmark suite, run by `nanfuse bench` and by pytest-benchmark in bench/."""

from .run import run

__all__ = ["run"]
