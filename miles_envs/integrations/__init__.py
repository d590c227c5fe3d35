"""Bridges to the surrounding ecosystem: Miles plug-points, foreign env libraries, an OpenAI-compatible endpoint."""
