"""miles-envs: Gym-style multi-turn environments, token-exact rollouts and RL training for LLM agents."""

from miles_envs.env import Env, Message, MultiAgentEnv, assistant, system, user
from miles_envs.trajectory import Status, Trajectory, Turn

__all__ = ["Env", "Message", "MultiAgentEnv", "Status", "Trajectory", "Turn", "assistant", "system", "user"]
__version__ = "0.1.0"
