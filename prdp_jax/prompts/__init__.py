"""Prompt sets: a registry of named sets (`registry.py`), prompt files (`files.py`), and loading
and sampling them (`sets.py`)."""
