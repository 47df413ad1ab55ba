"""Helpers of the reliability tests (tests/test_reliability_*.py): budgets, figures, hostile data, a fork server."""
