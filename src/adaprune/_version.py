"""The package version (its own module: modules below the package root read it without importing it)."""

__version__ = "0.1.0"
