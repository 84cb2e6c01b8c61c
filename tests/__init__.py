"""The test suite (a package, so tests import shared code as `tests.helpers.*`; the repo root is on the path)."""
