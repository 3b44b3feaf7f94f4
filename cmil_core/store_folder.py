"""The data folder: where the files that belong to a store live, beside it.

A results store is one DuckDB file; everything else it refers to (models'
weights, patch embeddings, reports, uploads, the dashboard's log) lies in the
folder that holds it. :class:`StoreFolder` owns that layout: every module asks
it for a path instead of joining folder names itself, so the layout is written
down once, here::

    <data folder>/                  the folder that holds the store file
    ├── cmil.duckdb                 the store (any name; ``CMIL_DB`` or ``--db``)
    ├── models/<model id>/          a model's weights and configuration
    ├── features/<encoder key>/     patch embeddings, one file per slide
    ├── checkpoints/<run key>/      a CNN fine-tuning run's checkpoints (resumed)
    ├── reports/<model>-<stamp>/    reports written from the Report page
    ├── uploads/<cohort>/           zips uploaded on the Cohorts page, and their slides
    ├── slides/<cohort>/<zip name>/ slides extracted from a zip given to ``ingest``
    ├── demo/                       the synthetic demo study's slides and tables
    ├── tile_cache/                 the slide viewer's cached tiles
    └── logs/cmil.log               the dashboard's job log (rotated)

A backup copies the store and :attr:`StoreFolder.ARTIFACT_FOLDERS`; the
others are inputs (slides, uploads, the demo), working files (checkpoints, the
tile cache) or the log. Nothing here creates a folder: asking for a path
leaves the disk as it was.

This is a top-level module, not part of :mod:`cmil_core.store` (which
re-exports :class:`StoreFolder`), because :mod:`cmil_core.logs` names the log
file and the top-level modules import no folder of the package. It takes a
:class:`~cmil_core.store.Store` by its ``path`` attribute for the same reason.

>>> folder = StoreFolder.of("/data/study/cmil.duckdb")
>>> folder.root.as_posix()
'/data/study'
>>> folder.model("abmil-1").relative_to(folder.root).as_posix()
'models/abmil-1'
>>> folder.log_file.relative_to(folder.root).as_posix()
'logs/cmil.log'
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

__all__ = ["StoreFolder", "StoreLike"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class _HasPath(Protocol):
    """An open store (:class:`cmil_core.store.Store`): anything with the store file's path."""

    @property
    def path(self) -> str | os.PathLike[str]: ...


#: What names a store: its file's path (text or path), or an open store.
StoreLike = str | os.PathLike[str] | _HasPath


@dataclass(frozen=True)
class StoreFolder:
    """The layout of the data folder beside the store file ``store_file``.

    Build it with :meth:`of`, which accepts what callers hold (a path as text
    or :class:`~pathlib.Path`, or an open store) and resolves ``~`` and
    relative paths, so two spellings of one store give equal folders.
    """

    store_file: Path

    #: Folders of the store's artifacts: a backup copies them with the store.
    ARTIFACT_FOLDERS: ClassVar[tuple[str, ...]] = ("models", "features", "reports")
    #: Folders where a killed run can leave temporary files (``cmil check``).
    WORK_FOLDERS: ClassVar[tuple[str, ...]] = ("models", "features", "reports", "demo", "slides")

    @classmethod
    def of(cls, store: StoreLike) -> StoreFolder:
        """The data folder of ``store`` (a path to the store file, or an open store)."""
        path = store if isinstance(store, (str, os.PathLike)) else store.path
        return cls(Path(path).expanduser().resolve())

    @property
    def root(self) -> Path:
        """The data folder itself: the folder that holds the store file."""
        return self.store_file.parent

    def folder(self, name: str) -> Path:
        """The folder ``name`` (one of the layout's top-level folders) under :attr:`root`."""
        return self.root / name

    @property
    def models(self) -> Path:
        """``models/``: one folder per model."""
        return self.root / "models"

    def model(self, model_id: str) -> Path:
        """``models/<model_id>/``: a model's weights (``model.pt``) and ``config.json``."""
        return self.models / model_id

    def is_model_folder(self, folder: str | os.PathLike[str]) -> bool:
        """Whether ``folder`` lies directly under ``models/`` (what may be deleted with a model)."""
        return Path(folder).resolve().parent == self.models.resolve()

    @property
    def features(self) -> Path:
        """``features/``: patch embeddings under ``<encoder key>/``, one file per slide."""
        return self.root / "features"

    @property
    def checkpoints(self) -> Path:
        """``checkpoints/``: CNN fine-tuning runs' checkpoints, one folder per run key."""
        return self.root / "checkpoints"

    def checkpoint(self, run_key: str) -> Path:
        """``checkpoints/<run_key>/``: one fine-tuning run's working folder."""
        return self.checkpoints / run_key

    @property
    def reports(self) -> Path:
        """``reports/``: reports written from the dashboard."""
        return self.root / "reports"

    def report(self, model_id: str, stamp: str) -> Path:
        """``reports/<model_id>-<stamp>/``, the model id cleaned to a folder name.

        >>> StoreFolder.of("/d/cmil.duckdb").report("cnn/abmil 2", "20260101-120000").name
        'cnn_abmil_2-20260101-120000'
        """
        return self.reports / f"{_UNSAFE.sub('_', model_id)}-{stamp}"

    @property
    def uploads(self) -> Path:
        """``uploads/``: files uploaded on the Cohorts page, one folder per cohort."""
        return self.root / "uploads"

    @property
    def slides(self) -> Path:
        """``slides/``: slides extracted from zips given to ``ingest``."""
        return self.root / "slides"

    def extracted(self, cohort: str, archive_stem: str) -> Path:
        """``slides/<cohort>/<archive_stem>/``: where a cohort's zip is extracted."""
        return self.slides / cohort / archive_stem

    @property
    def demo(self) -> Path:
        """``demo/``: the synthetic demo study (slides, clinical tables, manifests)."""
        return self.root / "demo"

    @property
    def tile_cache(self) -> Path:
        """``tile_cache/``: the slide viewer's cached tiles."""
        return self.root / "tile_cache"

    @property
    def logs(self) -> Path:
        """``logs/``: the dashboard's log files."""
        return self.root / "logs"

    @property
    def log_file(self) -> Path:
        """``logs/cmil.log``: the dashboard's job log (a failed job's traceback)."""
        return self.logs / "cmil.log"

    @property
    def artifact_folders(self) -> tuple[Path, ...]:
        """The folders a backup copies with the store (:attr:`ARTIFACT_FOLDERS`)."""
        return tuple(self.root / name for name in self.ARTIFACT_FOLDERS)
