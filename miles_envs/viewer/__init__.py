"""A self-contained HTML page for browsing trajectories: conversation, token view, filters."""

from miles_envs.viewer.page import PageStats, write_page

__all__ = ["PageStats", "write_page"]
