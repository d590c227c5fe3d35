"""Env ids → specs → instances: ``register``, ``make``, ``spec``, ``list_specs``."""

from miles_envs.registry.core import Registry, default_registry, list_specs, make, register, spec, store_for, unregister
from miles_envs.registry.errors import DuplicateEnv, EntryPointError, EnvNotFound, InvalidEnvId, NotAnEnv, RegistryError
from miles_envs.registry.spec import EnvSpec, parse_id

__all__ = [
    "DuplicateEnv", "EntryPointError", "EnvNotFound", "EnvSpec", "InvalidEnvId", "NotAnEnv", "Registry",
    "RegistryError", "default_registry", "list_specs", "make", "parse_id", "register", "spec", "store_for",
    "unregister",
]
