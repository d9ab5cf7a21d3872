"""Errors that are the user's to fix: each trainer reports them in one line and exits with status 2."""
import glob
import os


class UserError(Exception):
    """Bad input or setup (a config key, a path, a number out of range, a checkpoint that does not
    fit): the message says what is wrong and what would be valid, so no traceback is shown."""

    def __str__(self):  # KeyError's own str() would quote the message
        return str(self.args[0]) if self.args else ''


class ConfigError(UserError, ValueError):
    """A config value, flag or combination of them that cannot be used."""


class ConfigKeyError(UserError, KeyError):
    """A config key that does not exist (or is not read)."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder the user named that is not there."""


def require_config_file(path, folder, suffix):
    """`path` if it is a file; otherwise a MissingPathError listing the `suffix` files under `folder`
    (both relative to the current folder, as the trainers read them)."""
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(folder, '**', f'*{suffix}'), recursive=True))
    listing = ', '.join(found[:12]) + (f', ... ({len(found) - 12} more)' if len(found) > 12 else '')
    raise MissingPathError(f'config file {path!r} does not exist (paths are relative to the current folder, '
                           f'{os.getcwd()}); the configs here: {listing or "none"}')
