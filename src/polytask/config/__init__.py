"""YAML configuration schema and the builder that turns it into model, data and trainer."""

from polytask.config.schema import Config, load_config

__all__ = ["Config", "load_config"]
