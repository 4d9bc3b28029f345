"""Offline lm-eval task definitions for the data in ../shared/data (passed to lm-eval as --include_path)."""
