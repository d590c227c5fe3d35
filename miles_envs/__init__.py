"""miles-envs: Gym-style multi-turn environments, token-exact rollouts and RL training for LLM agents."""

from miles_envs.checker import CheckReport, EnvCheckError, check_env
from miles_envs.env import Env, Message, MultiAgentEnv, assistant, system, user
from miles_envs.registry import EnvSpec, list_specs, make, register, spec, unregister
from miles_envs.trajectory import Status, Trajectory, Turn

__all__ = [
    "CheckReport", "Env", "EnvCheckError", "EnvSpec", "Message", "MultiAgentEnv", "Status", "Trajectory", "Turn",
    "assistant", "check_env", "list_specs", "make", "register", "spec", "system", "unregister", "user",
]
__version__ = "0.1.0"
