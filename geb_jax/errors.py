"""Errors shared by every package: one home, so data/, train/, infer/ and export/ need not
import each other (or the model package) only to raise a configuration error.

Package-specific errors (TokenizerError, OnnxExportError, ...) stay beside the code that raises
them; those that are configuration problems subclass `ConfigError`.
"""


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names the field and the fix."""
