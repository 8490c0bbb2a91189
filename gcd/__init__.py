"""gcd: garbage collector for the local image cache of Docker engines on build hosts."""

# The one place the version is written; pyproject.toml reads it from here. (Asking
# importlib.metadata costs 35 ms of every start.)
__version__ = "0.1.0"
