"""Chat rendering for token-in/token-out rollouts (see ``renderer`` for the policy)."""

from miles_envs.chat.renderer import ChatRenderer, ChatRenderError, RenderedDelta

__all__ = ["ChatRenderError", "ChatRenderer", "RenderedDelta"]
