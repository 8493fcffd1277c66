"""Kept only while tests/test_modules.py imports ``spawn2`` from here: the helper now lives in
conftest.py as the ``spawn2`` fixture. Delete this file once no test imports it."""
from conftest import _spawn2 as spawn2, free_port  # noqa: F401
