"""The typed config tree (``schema``), its loader (``loader``) and cross-field rules (``validate``)."""

from megatron_vgpo.config.loader import ConfigError, dump_yaml, load_config
from megatron_vgpo.config.schema import Config
from megatron_vgpo.config.validate import validate

__all__ = ["Config", "ConfigError", "dump_yaml", "load_config", "validate"]
