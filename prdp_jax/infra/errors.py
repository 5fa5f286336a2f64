"""User-facing errors: `main` prints each as one line, with no traceback.

Raise these for bad input the user can fix (config, paths, weights, prompts, checkpoints); let
programming errors raise ordinary exceptions so they keep their tracebacks.
"""


def shorten(text: str, width: int = 80) -> str:
    """repr(text), cut in the middle to about `width` characters (error lines stay one line)."""
    r = repr(text)
    if len(r) <= width:
        return r
    half = (width - 5) // 2
    return f"{r[:half]} ... {r[-half:]} ({len(text):,} characters)"


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


class NonFiniteError(UserError):
    """A NaN or Inf in the loss, gradient, parameters or rewards: the run stops, nothing is saved."""


class OutputError(UserError):
    """An output that cannot be written (a full disk, a read-only folder)."""
