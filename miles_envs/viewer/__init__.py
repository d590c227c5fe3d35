"""A self-contained HTML page for browsing trajectories: conversation, token view, filters."""

from miles_envs.viewer.page import PageStats, write_page
from miles_envs.viewer.source import load_trajectories

__all__ = ["PageStats", "load_trajectories", "write_page"]
