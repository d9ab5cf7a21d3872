"""Checkpoint files: atomic writes, safe (weights-only) reads, strict loads with a clear key report."""
import io
import os
import pickle
import tempfile
import zipfile

import torch

from common.errors import MissingPathError, UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, written or loaded into the model."""


class OutputError(UserError, OSError):
    """An output folder that cannot be written to."""


def prepare_output(folder, option):
    """Create `folder` and write a probe file there, so that an unwritable folder or a full disk
    stops the run before any training; `option` names the setting that chose the folder."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(bytes(1 << 16))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(f'{option} {folder!r} cannot be written to ({e.strerror}); free some space or choose a '
                          f'writable folder') from None


def _write_atomic(path, write):
    """write(f) into a temporary file beside `path`, flush it to disk, then rename it over `path`:
    a crash or a full disk leaves the previous file intact, never a partial one. Temporary files
    that an earlier, killed write of `path` left behind are removed first."""
    folder, prefix = os.path.dirname(os.path.abspath(path)), '.' + os.path.basename(path) + '.'
    for name in os.listdir(folder):
        if name.startswith(prefix) and name.endswith('.tmp'):
            os.unlink(os.path.join(folder, name))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix='.tmp', dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide checkpoints from colleagues; logs get 0644
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        os.unlink(tmp)
        raise CheckpointError(f'could not write {path}: {e.strerror or e}; the previous file there, if any, is '
                              f'intact') from e
    except BaseException:
        os.unlink(tmp)
        raise


def save_atomic(obj, path):
    """torch.save(obj) to `path` atomically. The bytes are made in memory first, so that a failing
    disk surfaces as the system's own error (torch's file writer reports only a position mismatch)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write_atomic(path, lambda f: f.write(buffer.getbuffer()))


def write_text_atomic(text, path):
    """Write the string `text` to `path` atomically."""
    _write_atomic(path, lambda f: f.write(text.encode()))


_UMASK = os.umask(0o022)  # read the process's umask (there is no other way) and put it back
os.umask(_UMASK)


def load(path):
    """Read a checkpoint with torch.load(weights_only=True): tensors and plain data only, so a
    file carrying pickled code is refused instead of executed."""
    if not os.path.isfile(path):
        raise MissingPathError(f'checkpoint {path!r} does not exist')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f'{path}: refused to load objects other than tensors and plain data '
                              f'(weights_only=True): {str(e).splitlines()[0]}') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f'{path}: not a readable checkpoint (truncated or corrupt?): {e}') from None


def model_state(checkpoint, keys=('model', 'state_dict')):
    """The state_dict inside a trainer checkpoint, or the checkpoint itself if it is a bare one."""
    for key in keys:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    if isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise CheckpointError(f'no model weights found: expected a state_dict or a dict with one of {keys}')


def load_weights(model, state, strict=True, source='checkpoint', allowed_missing=()):
    """Load `state` into `model`, reporting exactly what did not match.

    strict: any missing, unexpected or mis-shaped key is an error naming the keys. Keys that
    match a pattern in `allowed_missing` may be missing (e.g. ISTA2's norms in an upstream
    checkpoint); they are reported. Returns the list of missing keys.
    """
    own = model.state_dict()
    shape_errors = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                    for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    tolerated = [k for k in missing if any(p in k for p in allowed_missing)]
    problems = []
    if shape_errors:
        problems.append(f'{len(shape_errors)} with another shape: {_preview(shape_errors)}')
    if strict and len(tolerated) < len(missing):
        problems.append(f'{len(missing) - len(tolerated)} missing: {_preview(sorted(set(missing) - set(tolerated)))}')
    if strict and unexpected:
        problems.append(f'{len(unexpected)} unexpected: {_preview(unexpected)}')
    if problems:
        raise CheckpointError(f'{source} does not fit this model ({type(model).__name__}); keys ' + '; '.join(problems)
                              + '. Is it from another architecture or config?')
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing


def _preview(keys, n=6):
    keys = list(keys)
    return ', '.join(keys[:n]) + (f', ... ({len(keys) - n} more)' if len(keys) > n else '')
