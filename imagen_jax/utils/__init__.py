"""Helpers shared by every layer (argument validation); they import nothing of the package."""
