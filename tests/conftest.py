"""Shared test setup: the pytester fixture (plugin tests run pytest inside pytest)."""

import pytest

pytest_plugins = ["pytester"]


@pytest.fixture
def preload_bindings() -> None:
    """Import the plugin and the falsifier modules (torch among them) in this process first.

    pytester's inline runs drop every module they imported when they end; a second
    import of torch in one process then crashes the interpreter.  Modules that run
    the plugin inline use it for every test (``pytestmark``).
    """
    import harness.plugin  # noqa: F401
    from harness import registry

    registry.load_bindings()
