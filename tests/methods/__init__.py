"""Tests of the multi-task methods and of the engine that applies them (a package, so that the
test modules share ``helpers`` and ``properties`` by relative import)."""
