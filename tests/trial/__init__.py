"""Tests run by ``trial`` (trial-style TestCases cannot run under pytest-twisted)."""
