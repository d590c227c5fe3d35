"""Envs shipped by installed packages through the ``miles_envs.envs`` entry-point group.

Each entry point is named by an env id and points at ``module:Class``; nothing is imported until
the env is made.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from miles_envs.registry.spec import EnvSpec

GROUP = "miles_envs.envs"


def plugin_specs() -> list[EnvSpec]:
    specs = []
    for ep in entry_points(group=GROUP):
        origin = ep.dist.name if ep.dist is not None else None
        specs.append(EnvSpec(id=ep.name, entry_point=ep.value, source="plugin", origin=origin))
    return specs
