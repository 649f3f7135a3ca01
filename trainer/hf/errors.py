"""The one error type of trainer.hf: an input the user can fix (wrong file, config that does not match the weights,
an HF feature our model lacks). Each message names the key, field or path and says what to do."""

from __future__ import annotations


class HFConversionError(ValueError):
    user_error = True  # launch/cli.py prints the message without a traceback
