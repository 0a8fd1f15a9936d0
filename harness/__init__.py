"""Contract harness: YAML falsification contracts become pytest items, verdicts and a report."""
