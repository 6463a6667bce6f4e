"""Atomic file writes: a crash mid-save never destroys what was already on disk."""
import os
import tempfile


def atomic_write(path, write, mode="wb"):
    """Call write(fileobj) on a temporary file beside `path`, fsync it, then rename it over `path`.

    The rename is atomic on POSIX and Windows (os.replace), so readers see the old file or the new
    one, never a half-written one; on any exception the temporary file is removed and `path` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
