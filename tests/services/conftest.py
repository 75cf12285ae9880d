"""Fixtures for the services' tests."""

from __future__ import annotations

from logfire.testing import capfire  # noqa: F401 - the fixture, here rather than through logfire's pytest plugin
