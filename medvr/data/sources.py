"""Real VQA datasets (a local directory or a hub id) mapped onto the medvr record schema.

medvr runs offline by default, so a hub id that cannot be reached fails with an error that says
how to point `data.path` at a local copy instead. Rows are checked by VQADataModule.setup,
which decodes every image once per dataset version.
"""

import os
from pathlib import Path

import datasets

from medvr.data.schema import FEATURES, FIELDS, OPTIONAL_FIELDS

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _hub_offline() -> bool:
    """True when the hub is switched off, also if the variable was set after datasets was imported."""
    flags = [os.environ.get(var, "").strip().upper() for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")]
    return bool(datasets.config.HF_HUB_OFFLINE) or any(f in ("1", "ON", "YES", "TRUE") for f in flags)


class HFVQASource:
    """Data source over a Hugging Face dataset; `splits` maps medvr split -> dataset split name,
    `columns` maps schema field -> dataset column (fields already named like the schema need none).
    """

    def __init__(
        self,
        path: str,
        splits: dict[str, str],
        columns: dict[str, str] | None = None,
        cache_dir: str | None = None,
    ):
        self.path = str(path)
        self.name = self.path
        self.splits = dict(splits)
        self.columns = dict(columns or {})
        self.cache_dir = cache_dir  # load_dataset's cache; None = the datasets default

    def load(self) -> datasets.DatasetDict:
        raw = self._load_raw()
        out = {}
        for split, source_split in self.splits.items():
            if source_split not in raw:
                raise ValueError(
                    f"{self.path}: has no split '{source_split}' (asked for medvr split '{split}'); "
                    f"it has {sorted(raw)}; set data.source.splits.{split}=<one of them>"
                )
            out[split] = self._to_schema(raw[source_split], f"{self.path}/{source_split}")
        return datasets.DatasetDict(out)

    def _local_root(self) -> Path | None:
        """Directory that relative image paths are resolved against, or None for a hub id."""
        local = Path(self.path).expanduser()
        if local.is_dir():
            return local
        return local.parent if local.is_file() else None

    def _load_raw(self) -> datasets.DatasetDict:
        local = Path(self.path).expanduser()
        if local.is_dir() and any((local / f).is_file() for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(local))  # written by save_to_disk
        elif local.is_file():
            builder = _FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"{self.path}: cannot read '{local.suffix}' files; use one of "
                    f"{sorted(_FILE_BUILDERS)} or a directory saved with save_to_disk"
                )
            loaded = datasets.load_dataset(builder, data_files=str(local), cache_dir=self.cache_dir)
        elif local.is_dir():
            # A folder of data files (json, csv, parquet) or an imagefolder with metadata.
            loaded = datasets.load_dataset(str(local), cache_dir=self.cache_dir)
        elif _hub_offline():
            raise FileNotFoundError(
                f"'{self.path}' is not a local path and the Hugging Face hub is disabled "
                "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); download the dataset elsewhere and pass "
                "its local directory via data.path=/local/dir"
            )
        else:
            try:
                loaded = datasets.load_dataset(self.path, cache_dir=self.cache_dir)
            except Exception as err:  # connection, auth and not-found errors all end up here
                raise RuntimeError(
                    f"'{self.path}' is not a local path and could not be loaded from the Hugging "
                    f"Face hub ({type(err).__name__}: {err}); if the hub is unreachable, pass a "
                    "local copy via data.path=/local/dir"
                ) from err
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({"train": loaded})
        return loaded

    def _to_schema(self, rows: datasets.Dataset, where: str) -> datasets.Dataset:
        """Rename mapped columns, keep only the schema's, add an empty bbox, resolve image paths."""
        unknown = sorted(set(self.columns.values()) - set(rows.column_names))
        if unknown:
            raise ValueError(
                f"{where}: column(s) {unknown} named in data.source.columns do not exist; "
                f"the dataset has {rows.column_names}"
            )
        renames = {column: field for field, column in self.columns.items() if column != field}
        # An unmapped column that already carries a target name would clash with the rename.
        clashing = [c for c in renames.values() if c in rows.column_names and c not in renames]
        rows = rows.remove_columns(clashing).rename_columns(renames)
        absent = [f for f in FIELDS if f not in rows.column_names and f not in OPTIONAL_FIELDS]
        if absent:
            raise ValueError(
                f"{where}: no column for schema field(s) {absent}; the dataset has "
                f"{rows.column_names}; map them with data.source.columns.<field>=<column>"
            )
        rows = rows.select_columns([f for f in FIELDS if f in rows.column_names])
        for field in OPTIONAL_FIELDS:
            if field not in rows.column_names:
                rows = rows.add_column(field, [None] * len(rows), feature=FEATURES[field])
        root = self._local_root()
        if rows.features["image"] == datasets.Value("string"):
            if root is not None:
                rows = rows.map(
                    lambda batch: {"image": [_resolve(p, root) for p in batch["image"]]},
                    batched=True,
                    keep_in_memory=True,  # never write cache files into the user's data dir
                )
            rows = rows.cast_column("image", datasets.Image())  # decode paths to PIL on access
        return rows


def _resolve(path: str | None, root: Path) -> str | None:
    return path if path is None or os.path.isabs(path) else str(root / path)
