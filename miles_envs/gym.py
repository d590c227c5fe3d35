"""Import target for ``gymnasium.make("miles_envs.gym:ns/Name-v0")``: registers every env with Gymnasium."""

from miles_envs.registry.gym_bridge import register_all

register_all()
