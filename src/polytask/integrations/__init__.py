"""Integrations with other training frameworks (optional extras): ``polytask.integrations.lightning``."""
