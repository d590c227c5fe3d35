"""megatron-core backend: GPTModel from HF configs, HF<->megatron weights, R3 via RouterReplay, MTP.

Importing this package does not import megatron-core; each module imports it where it is used.
"""

from miles_envs.trainer.megatron.model import MegatronSettings

__all__ = ["MegatronSettings"]
