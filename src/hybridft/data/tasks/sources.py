"""Where benchmark records come from: a local folder of the original files (``--data-dir`` or
$HYBRIDFT_DATA_DIR), or the Hugging Face ``datasets`` hub when neither is set. Both give records
shaped like the hub's, so one function per task turns a record into an ``Example`` and every
source yields the same examples. Every error is one line naming the file (or hub name)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hybridft.data.tasks.task import Example

ENV = "HYBRIDFT_DATA_DIR"
Record = dict[str, Any]


def local_root(explicit: str | None) -> Path | None:
    """The local data folder: ``explicit``, else $HYBRIDFT_DATA_DIR, else None (use the hub)."""
    value = explicit or os.environ.get(ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ValueError(f"{path}: data directory not found (from --data-dir or ${ENV})")
    return path


def local_file(root: Path, folders: Iterable[str], name: str) -> Path:
    """``root/<folder>/name`` for the first folder that has it (GLUE and SuperGLUE name their
    folders differently from the hub: SST-2 or sst2, WSC or wsc)."""
    folders = list(folders)
    for folder in folders:
        if (root / folder / name).is_file():
            return root / folder / name
    raise ValueError(f"{root / folders[0] / name}: file not found")


def read_jsonl(path: Path) -> list[Record]:
    """One JSON object per non-empty line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object per line")
            records.append(record)
    return records


def read_table(path: Path, delimiter: str) -> list[Record]:
    """Rows of a CSV (``,``) or TSV (``\\t``, read unquoted as GLUE writes it) file with a header."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, encoding="utf-8", newline="") as f:
        try:
            return list(csv.DictReader(f, delimiter=delimiter, quoting=quoting))
        except csv.Error as error:
            raise ValueError(f"{path}: not a valid {'TSV' if delimiter == chr(9) else 'CSV'} file ({error})") from error


def read_records(path: Path) -> list[Record]:
    """A .jsonl, .tsv or .csv file's records, by suffix."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    if suffix in (".tsv", ".csv"):
        return read_table(path, "\t" if suffix == ".tsv" else ",")
    raise ValueError(f"{path}: unknown file format {suffix!r} (use .csv, .tsv or .jsonl)")


def require(records: list[Record], columns: Iterable[str], where: str | Path) -> None:
    """ValueError naming ``where`` if the first record lacks a column (or there are none)."""
    if not records:
        raise ValueError(f"{where}: no records")
    missing = [c for c in columns if c not in records[0]]
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)} (has: {', '.join(map(str, records[0]))})")


def hub_records(path: str, name: str | None, split: str, *, local_hint: str) -> list[Record]:
    """``datasets.load_dataset(path, name, split=split)`` as a list of records (needs network)."""
    try:
        import datasets
    except ImportError as error:
        raise ValueError(f"no local copy given (--data-dir or ${ENV} with {local_hint}) and the datasets "
                         f"package is not installed to download {path}/{name} (pip install datasets)") from error
    try:
        return [dict(r) for r in datasets.load_dataset(path, name, split=split)]
    except Exception as error:  # network, hub or cache errors all end the run the same way
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"cannot load {path}/{name} ({split}) from the datasets hub: {message}; "
                         f"or give a local copy with --data-dir ({local_hint})") from error


def records(root: Path | None, *, folders: Iterable[str], file: str, hub: tuple[str, str], split: str,
            columns: Iterable[str], local_hint: str) -> tuple[list[Record], str]:
    """One split's records and where they came from: ``root/<folder>/file`` when a local folder
    is given, else the hub's ``split`` of ``hub`` = (path, config name)."""
    if root is not None:
        path = local_file(root, folders, file)
        found, where = read_records(path), str(path)
    else:
        found, where = hub_records(*hub, split, local_hint=local_hint), f"{hub[0]}/{hub[1]} {split}"
    require(found, columns, where)
    return found, where


def benchmark_splits(data_dir: str | None, seed: int, *, files: dict[str, tuple[str, str]], folders: Iterable[str],
                     hub: tuple[str, str], columns: Iterable[str], local_hint: str,
                     example: Callable[[Record, str], Example],
                     prepare: Callable[[list[Record], str], list[Record]] = lambda found, where: found,
                     ) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, dev, test) examples of a benchmark whose ``files`` map "train" and "test" to
    (local file name, hub split): dev is a seeded 10% held out of train, test is the official
    validation split. ``prepare`` completes a split's records (e.g. labels from a side file)."""
    from hybridft.data.tasks.task import holdout

    root = local_root(data_dir)
    splits = {}
    for split, (file, hub_split) in files.items():
        found, where = records(root, folders=folders, file=file, hub=hub, split=hub_split, columns=columns,
                               local_hint=local_hint)
        splits[split] = [example(r, f"{where} record {i + 1}") for i, r in enumerate(prepare(found, where))]
    train, dev = holdout(splits["train"], seed)
    return train, dev, splits["test"]
