"""The errors an entry point reports as one line (`sid.config.run_cli`) instead of a traceback.

Each is the user's to fix (a bad preset, a bad data row) or to act on (a diverged run); `exit_code` is the process's
exit status. This module imports nothing of sid's, so any module may raise these without importing the trainer.
"""

from __future__ import annotations

from typing import ClassVar


class UserError(Exception):
    """An error whose message alone tells the user what to fix: file, line or key, and why."""

    exit_code: ClassVar[int] = 2


class ConfigError(UserError, ValueError):
    """A preset or override that does not fit its dataclass; the message names the file and the key."""


class NonFiniteLoss(UserError, RuntimeError):
    """The loss, gradient norm or update norm became NaN/Inf; training stopped before saving the poisoned params,
    and the last good checkpoint was kept."""

    exit_code = 1
