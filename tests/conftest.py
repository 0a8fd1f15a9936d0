"""Shared test setup: the pytester fixture (plugin tests run pytest inside pytest)."""

pytest_plugins = ["pytester"]
