"""Atomic file writes (a crash mid-save never destroys what was already on disk) and one error contract for
every file reader (whatever a damaged file makes a library raise is a ValueError naming the file)."""
import contextlib
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


@contextlib.contextmanager
def reading(prefix, what):
    """Every failure while a file's content is parsed becomes a ValueError naming the file.

    ``prefix`` is how the reader's own messages start, with the file (``"cnnx.load: /data/model.npz"``);
    ``what`` says what the file turned out not to be (``"is not a readable cnnx checkpoint"``). A ValueError
    whose message starts with ``prefix`` already names the file and passes as it is; any other Exception --
    what zipfile, gzip, tarfile, json or numpy raise on damaged input (BadZipFile, NotImplementedError,
    EOFError, zlib.error, OSError, struct.error, RecursionError, ...), and the KeyError or TypeError of a
    well-formed file with fields of the wrong type -- becomes
    ``ValueError(f"{prefix} {what} (corrupt or truncated: {type}: {message})")``. MemoryError passes
    unchanged, and so do KeyboardInterrupt and SystemExit (not Exceptions). Open the file *before* entering:
    a missing path is the caller's FileNotFoundError, not a corrupt file.
    """
    try:
        yield
    except MemoryError:
        raise
    except Exception as exc:
        if isinstance(exc, ValueError) and str(exc).startswith(prefix):
            raise
        kind = type(exc).__qualname__
        if type(exc).__module__ not in ("builtins", "__main__"):
            kind = f"{type(exc).__module__}.{kind}"        # zlib.error, zipfile.BadZipFile, tarfile.ReadError
        raise ValueError(f"{prefix} {what} (corrupt or truncated: {kind}: {exc})") from None
