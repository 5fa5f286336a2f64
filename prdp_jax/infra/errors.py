"""User-facing errors: `main` prints each as one line, with no traceback.

Raise these for bad input the user can fix (config, paths, weights, prompts, checkpoints); let
programming errors raise ordinary exceptions so they keep their tracebacks.
"""


class UserError(Exception):
    """Bad input the user can fix; the message says what to fix, in one line."""


class ConfigError(UserError):
    """An impossible or unknown configuration value."""


class CheckpointError(UserError):
    """A checkpoint directory that is corrupted, foreign, or does not match the config."""


class WeightsError(UserError):
    """Model weights that are missing, malformed, or disagree with the config in shape."""


class PromptError(UserError):
    """A prompt that the tokenizer or world cannot handle."""
