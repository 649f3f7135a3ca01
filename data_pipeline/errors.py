"""Errors of the data layer. Each message names the file (and line or shard) and says what to do.

`user_error = True` tells the CLI to print the message without a traceback: these are problems with the input
or the arguments, not bugs.
"""


class DataPipelineError(Exception):
    user_error = True


class BadInputError(DataPipelineError):
    """Malformed input record or file (raised in `--strict` mode; otherwise the record is skipped and reported)."""


class ShardIntegrityError(DataPipelineError):
    """A shard is missing, truncated or does not match the sha256 recorded in the manifest."""


class ManifestMismatchError(DataPipelineError):
    """Loader state or config does not belong to this manifest (different data, tokenizer or format)."""
