"""Capacity planning from the project's measured benchmark results."""
