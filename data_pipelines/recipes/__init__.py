"""Recipes that build the committed data under ``data_pipelines/bundled/`` (developer machines only)."""
