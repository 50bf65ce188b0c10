"""Where a sweep's files live and how they are written: a local path or a URI (`s3://`, `gs://`,
`file://`) through pyarrow's filesystems; atomic writes; the sweep folder's layout.

```
<storage>/<sweep name>/          sweep_root()
  trials.json                    the trial list a run started with (--resume checks it)
  results.parquet  history.parquet
  tune/                          Tune's experiment folder (TensorBoard events, searcher state)
  train-<trial id>/checkpoint_*  each trial's Ray Train run (checkpoint.py: what is inside)
  frontier.parquet  report.md  *.png
```
Torch-free and Ray-free.
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TRIALS_FILE = "trials.json"
RESULTS_FILE = "results.parquet"
HISTORY_FILE = "history.parquet"
TUNE_DIR = "tune"


def sweep_root(storage: str, sweep_name: str) -> str:
    """`<storage>/<sweep name>`: a local absolute path, or a URI left as it is."""
    if "://" in storage:
        return storage.rstrip("/") + "/" + sweep_name
    return os.path.join(os.path.abspath(os.path.expanduser(storage)), sweep_name)


def join(root: str, *parts: str) -> str:
    """`root/part/...` for a local path or a URI (always `/`)."""
    return "/".join([root.rstrip("/"), *parts])


def train_run_name(trial_id: str) -> str:
    """The Ray Train run of a trial, named after its id so that a resumed trial finds its checkpoints."""
    return f"train-{trial_id}"


def read_text(uri: str) -> str | None:
    """The text of the file at `uri`, or None when there is none."""
    if not exists(uri):
        return None
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def is_local(uri: str) -> bool:
    return "://" not in uri


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) for a local path or a URI (``s3://``, ``gs://``, ``file://``)."""
    if is_local(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())
    return pafs.FileSystem.from_uri(uri)


def exists(uri: str) -> bool:
    """Whether a file or folder is at ``uri``."""
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def delete_dir(uri: str) -> None:
    """Remove the folder at ``uri`` and everything under it."""
    fs, path = filesystem(uri)
    fs.delete_dir(path)


def write_atomic(uri: str, write: Callable[[Any], None]) -> None:
    """Call ``write(stream)`` to fill the file at ``uri`` so that readers see the old file or the
    new one, never a part.

    Local path: write ``<name>.tmp-<pid>-<rand>`` in the same folder, fsync, ``os.replace``
    (atomic rename on POSIX and Windows). URI (``s3://``, ``gs://``, ``file://``, any pyarrow.fs
    scheme): write a temporary object next to the target, then ``fs.move``. On object stores
    the move is a server-side copy whose single PUT is atomic, so ``uri`` is never partial.
    On any error the temporary file is removed and the error re-raised.
    """
    suffix = f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    if is_local(uri):
        path = Path(uri).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + suffix)
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp_path = path + suffix
    try:
        with fs.open_output_stream(tmp_path) as stream:
            write(stream)
        fs.move(tmp_path, path)
    except BaseException:
        try:
            fs.delete_file(tmp_path)
        except (OSError, FileNotFoundError):
            pass
        raise


def write_bytes_atomic(data: bytes, uri: str) -> None:
    """``data`` to ``uri``, atomically (see `write_atomic`)."""
    write_atomic(uri, lambda stream: stream.write(data))


def write_parquet_atomic(table: pa.Table, uri: str) -> None:
    """``table`` as Parquet to ``uri``, atomically (see `write_atomic`)."""
    write_atomic(uri, lambda stream: pq.write_table(table, stream))


def read_parquet(uri: str) -> pa.Table | None:
    """The table at ``uri``, or None when there is no file yet."""
    if not exists(uri):
        return None
    fs, path = filesystem(uri)
    return pq.read_table(path, filesystem=fs)


