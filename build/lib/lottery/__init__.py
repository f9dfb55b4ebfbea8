"""lottery: a research framework for the lottery ticket hypothesis."""
