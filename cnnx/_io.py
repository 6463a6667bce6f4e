"""Atomic file writes: a crash mid-save never destroys what was already on disk."""
import os
import secrets


def atomic_write(path, write, mode="wb"):
    """Call write(fileobj) on a temporary file beside `path`, fsync it, then rename it over `path`.

    The rename is atomic on POSIX and Windows (os.replace), so readers see the old file or the new
    one, never a half-written one; on any exception the temporary file is removed and `path` is untouched.
    The new file gets the permissions open() would give it (0666 less the umask).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"atomic_write: could not create a temporary file beside {path}")
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
