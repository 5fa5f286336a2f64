"""Black-box rewards: the registry (`registry.py`), building and combining them by name
(`combine.py`), and the built-in rewards, one module each."""
