"""compress: turn a big, accurate vision model into small, fast ones, with the numbers to prove it."""

__version__ = "0.1.0"
