"""The server process's collector thresholds (pulsyflux/server/collector.py)."""

from __future__ import annotations

import gc
import platform

import pytest

from pulsyflux import service
from pulsyflux.server import collector


@pytest.fixture
def thresholds():
    """Whatever a test sets, the session's thresholds come back after it."""
    before = gc.get_threshold() if hasattr(gc, "get_threshold") else None  # PyPy has none
    yield
    if before is not None:
        gc.set_threshold(*before)


def test_a_server_process_collects_its_young_objects_far_less_often_on_cpython(thresholds):
    if platform.python_implementation() != "CPython":
        assert not collector.tune_collector()  # PyPy's own collector is left as it is
        return
    gc.set_threshold(700, 10, 10)  # CPython's defaults
    assert collector.tune_collector()
    assert gc.get_threshold() == collector.SERVER_THRESHOLDS
    assert collector.SERVER_THRESHOLDS[0] >= 100 * 700


def test_twistd_s_service_sets_the_collector(thresholds, monkeypatch):
    calls = []
    monkeypatch.setattr(service, "tune_collector", lambda: calls.append(1))
    options = service.Options()
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--no-broker"])
    service.makeService(options)
    assert calls == [1]
