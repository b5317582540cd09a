"""Hydra configuration files, shipped inside the wheel."""
