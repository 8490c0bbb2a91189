"""gcd: garbage collector for the local image cache of Docker engines on build hosts."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gcd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
