"""Where ``moai batch`` writes: JSONL or Parquet by suffix, crash-safe and resumable.

How a run stays safe when it is killed:

* While the run goes on, every completed batch is appended to a **journal** next to the output
  (``OUTPUT.journal.jsonl``) in one write, then flushed and ``fsync``-ed. The output file itself is not touched.
* When the run ends (or is interrupted with Ctrl-C), the output is written **once**: to a temporary file in the
  same folder, then renamed over OUTPUT (an atomic rename). Readers therefore only ever see no OUTPUT, the previous
  complete OUTPUT, or the new complete one -- never a half-written file. For JSONL the journal is simply renamed
  when there is no previous output; Parquet is converted from the journal.
* A run killed with SIGKILL (or a power cut) leaves the journal. Its last line may be cut off mid-write: the
  journal is read up to its last complete line, so at most the batch in flight is lost. ``--resume`` reads the ids
  already in OUTPUT and in the journal, runs only the others, and writes OUTPUT as old rows + new rows, each id
  exactly once, in the order they were completed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Union

from ..errors import InputError, import_optional

logger = logging.getLogger(__name__)

#: Output suffixes and their format.
OUTPUT_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
JOURNAL_SUFFIX = ".journal.jsonl"


def output_format(path: Union[str, Path]) -> str:
    """``"jsonl"`` or ``"parquet"`` from the output's suffix, or :class:`InputError`."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise InputError(
            f"cannot tell the output format of {str(path)!r}: use a {', '.join(sorted(OUTPUT_SUFFIXES))} suffix"
        )
    return OUTPUT_SUFFIXES[suffix]


def journal_path(path: Union[str, Path]) -> Path:
    """The journal of an output file: ``answers.parquet`` -> ``answers.parquet.journal.jsonl``."""
    p = Path(path)
    return p.with_name(p.name + JOURNAL_SUFFIX)


def _json_default(value: Any) -> Any:
    """JSON for the values a carried column may hold (numpy scalars and arrays, bytes, dates)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"cannot write a {type(value).__name__} value as JSON")


def _clean(value: Any) -> Any:
    """NaN and infinities (e.g. empty CSV/Parquet cells read as NaN) become ``null``: they are not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def encode_rows(rows: Iterable[dict[str, Any]]) -> bytes:
    """One JSON line per row, UTF-8."""
    lines = [
        json.dumps({k: _clean(v) for k, v in row.items()}, ensure_ascii=False, default=_json_default) for row in rows
    ]
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def read_journal(path: Union[str, Path]) -> tuple[list[dict[str, Any]], int]:
    """The complete rows of a journal and the byte length they span (a cut-off last line is left out)."""
    p = Path(path)
    if not p.is_file():
        return [], 0
    data = p.read_bytes()
    rows: list[dict[str, Any]] = []
    good = 0
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end == -1:
            break  # no newline: the write of this line did not finish
        line = data[pos:end]
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn write; everything after it is from the same batch
        pos = end + 1
        good = pos
    if good < len(data):
        logger.warning("%s: dropping %d bytes of an incomplete last batch", p.name, len(data) - good)
    return rows, good


def read_rows(path: Union[str, Path]) -> list[dict[str, Any]]:
    """The rows of a ``moai batch`` output (JSONL or Parquet) as dicts."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"output file not found: {str(p)!r}")
    if output_format(p) == "jsonl":
        rows = []
        with p.open("r", encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise InputError(f"{p.name} line {number} is not valid JSON: {exc}") from exc
        return rows
    pq = _parquet()
    try:
        return pq.read_table(p).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise InputError(f"cannot read {str(p)!r} as Parquet: {type(exc).__name__}: {exc}") from exc


def _parquet() -> Any:
    return import_optional("pyarrow.parquet", "Parquet output needs pyarrow: pip install 'moai-sdk[parquet]'")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        logger.debug("fsync of %s not supported", folder)
    finally:
        os.close(fd)


class OutputWriter:
    """Appends completed batches to the journal of ``path`` and writes ``path`` atomically at the end.

    ``resume=True`` continues an earlier run (its output and/or journal); otherwise an existing output or
    journal is refused unless ``overwrite=True``, which deletes them. :attr:`done_ids` holds the ids already
    written (only non-empty when resuming).
    """

    def __init__(self, path: Union[str, Path], *, resume: bool = False, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.format = output_format(self.path)
        if self.format == "parquet":
            _parquet()  # fail before any work when pyarrow is missing
        self.journal = journal_path(self.path)
        if not self.path.parent.is_dir():
            raise InputError(f"the output folder {str(self.path.parent)!r} does not exist")
        leftovers = [p for p in (self.path, self.journal) if p.exists()]
        if leftovers and not resume:
            if not overwrite:
                raise InputError(
                    f"{', '.join(repr(str(p)) for p in leftovers)} already exist(s); pass --resume to continue that "
                    "run (rows already written are skipped) or --overwrite to start again"
                )
            for p in leftovers:
                p.unlink()
        self._previous_ids: list[str] = []
        if resume and self.path.exists():
            self._previous_ids = [str(r["id"]) for r in read_rows(self.path)]
        journal_rows, good = read_journal(self.journal)
        if self.journal.exists() and good < self.journal.stat().st_size:
            with self.journal.open("r+b") as fh:  # cut the torn tail so appends start on a line boundary
                fh.truncate(good)
        self.done_ids: set[str] = set(self._previous_ids) | {str(r["id"]) for r in journal_rows}
        self.written = 0

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append one completed batch to the journal: one write, flushed and fsync-ed."""
        if not rows:
            return
        data = encode_rows(rows)
        fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.done_ids.update(str(r["id"]) for r in rows)
        self.written += len(rows)

    def finalize(self, complete: bool = True) -> Path:
        """Write the output (previous rows, then the journal's) to a temporary file, rename it over ``path``,
        and delete the journal. Returns ``path``. With nothing written at all, an empty output is created only
        for a ``complete`` run (a run that failed before its first row leaves no file)."""
        journal_rows, _ = read_journal(self.journal)
        if not journal_rows and (self.path.exists() or not complete):
            self._remove_journal()
            return self.path
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            if self.format == "jsonl":
                self._finalize_jsonl(tmp)
            else:
                self._finalize_parquet(tmp, journal_rows)
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(self.path.parent)
        self._remove_journal()
        return self.path

    def _finalize_jsonl(self, tmp: Path) -> None:
        with tmp.open("wb") as out:
            for source in (self.path, self.journal):
                if source.exists():
                    with source.open("rb") as fh:
                        for line in fh:
                            if line.strip():
                                out.write(line if line.endswith(b"\n") else line + b"\n")
            out.flush()
            os.fsync(out.fileno())

    def _finalize_parquet(self, tmp: Path, journal_rows: list[dict[str, Any]]) -> None:
        pq = _parquet()
        rows = (read_rows(self.path) if self.path.exists() else []) + journal_rows
        pq.write_table(rows_to_table(rows), tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())

    def _remove_journal(self) -> None:
        if self.journal.exists():
            self.journal.unlink()


def rows_to_table(rows: list[dict[str, Any]]) -> Any:
    """A pyarrow table of ``rows``: every column any row has (missing cells are null; dict columns such as
    ``timings`` become structs whose absent keys read back as null). A carried column whose values Arrow cannot
    hold in one type (e.g. numbers in some rows, text in others) is written as JSON text."""
    import pyarrow as pa

    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    arrays = {}
    for name in columns:
        values = [_clean(row.get(name)) for row in rows]
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            logger.warning("column %r mixes value types; writing it to Parquet as JSON text", name)
            arrays[name] = pa.array(
                [None if v is None else json.dumps(v, ensure_ascii=False, default=_json_default) for v in values],
                type=pa.string(),
            )
    return pa.table(arrays)


def iter_ids(path: Union[str, Path]) -> Iterator[str]:
    """The ids of an output file, in order."""
    for row in read_rows(path):
        yield str(row["id"])


__all__ = [
    "OutputWriter",
    "output_format",
    "journal_path",
    "read_rows",
    "read_journal",
    "encode_rows",
    "iter_ids",
    "rows_to_table",
    "OUTPUT_SUFFIXES",
]
