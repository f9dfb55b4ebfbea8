"""lottery: a research framework for the lottery ticket hypothesis."""

__version__ = "0.1.0"  # also in pyproject.toml (tests/test_cli_consistency.py compares them)
