"""Helpers shared by the tests' fixtures."""
