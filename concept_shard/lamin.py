"""Register source files and shard datasets in the current lamindb instance (``--lamindb``).

Everything is registered *in place*: the project (``PROJECT_PATH``, holding ``data/`` and
``shards/``) must lie inside the instance's storage root, as after
``cd PROJECT_PATH && lamin init --storage .``. Nothing is copied and nothing calls LaminHub,
so this works offline against a local SQLite instance. One ``LaminRun`` is one tracked run of
a ``Transform`` (kind ``pipeline``): sources are its inputs, shard datasets its outputs, so
``output.run.input_artifacts`` gives the lineage.

Which instance is "current" is lamindb's own rule: ``$LAMIN_CURRENT_INSTANCE``, else the
``.lamin/current_instance`` marker that ``lamin init`` leaves in the directory it ran in (looked
for from the working directory upwards), else the default in ``$LAMIN_SETTINGS_DIR/.lamin``
(``~/.lamin``). When none of these gives one, ``check_instance`` also looks for that marker at
or above ``PROJECT_PATH``, so the tool works from any working directory. (Offline, avoid
``lamin connect`` and ``ln.track()``: both call LaminHub; so does registering a path outside
the storage root, which is why that is refused here first.)

lamindb is imported only inside these functions (``import lamindb`` takes 1-2 s).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

INIT_HINT = (
    "Create a local instance whose storage root is PROJECT_PATH or a folder above it, e.g. "
    "`cd PROJECT_PATH && lamin init --storage .` (works offline). concept-shard uses lamindb's "
    "current instance: $LAMIN_CURRENT_INSTANCE=<owner>/<name>, else the one `lamin init` set up "
    "in the working directory or a folder above it, else your default one, else the one set up "
    "in PROJECT_PATH or a folder above it."
)


class LaminError(Exception):
    """lamindb cannot be used as asked; the message says what to do."""


def _lamindb():
    try:
        import lamindb as ln
    except ImportError as e:
        raise LaminError(
            f"--lamindb needs the lamindb package, which cannot be imported ({e}). "
            "Install it with `pip install 'concept-pretrain[lamindb]'` (lamindb==2.12.1)."
        ) from e
    return ln


def _marker_instance(start: Path) -> str | None:
    """Instance slug from a ``.lamin/current_instance`` marker at or above ``start``."""
    for directory in (start, *start.parents):
        marker = directory / ".lamin" / "current_instance"
        if marker.is_file():
            slug = marker.read_text().strip()
            return slug or None
    return None


def _connect(project_path: Path | None = None):
    """The lamindb module, connected to the current instance (see the module docstring)."""
    ln = _lamindb()
    if not ln.setup.settings.is_configured and project_path is not None:
        slug = _marker_instance(Path(project_path).resolve())
        owner, _, name = (slug or "").partition("/")
        # connect only to an instance set up on this machine: an unknown one means LaminHub
        if name and (ln.setup.settings.settings_dir / f"instance--{owner}--{name}.env").is_file():
            ln.connect(slug)
    if not ln.setup.settings.is_configured:
        raise LaminError(f"--lamindb needs a current lamindb instance, and none is configured. {INIT_HINT}")
    return ln


def _storage_root(ln) -> Path:
    storage = ln.setup.settings.storage
    slug = ln.setup.settings.instance.slug
    if storage.type_is_cloud:
        raise LaminError(
            f"The current lamindb instance {slug} keeps its files at {storage.root_as_str}, not on "
            f"this machine, so local files cannot be registered in place. Use a local instance. {INIT_HINT}"
        )
    return Path(storage.root_as_str).resolve()


def _require_inside_root(ln, path: Path, what: str) -> Path:
    path = Path(path).resolve()
    root = _storage_root(ln)
    if not path.is_relative_to(root):
        raise LaminError(
            f"{what} {path} is outside the storage root {root} of the current lamindb instance "
            f"{ln.setup.settings.instance.slug}; concept-shard registers files in place, so the "
            f"instance must be initialized with --storage at or above PROJECT_PATH. {INIT_HINT}"
        )
    return path


def _lamindb_managed(ln, path: Path) -> bool:
    """Whether ``path`` lies in the ``.lamindb/`` folder where lamindb keeps the files it copied."""
    return path.is_relative_to(_storage_root(ln) / ".lamindb")


def check_instance(project_path: Path) -> None:
    """Raise LaminError unless a current instance exists whose storage root holds ``project_path``.

    Connects to that instance in this process (see the module docstring for how it is found).
    """
    ln = _connect(project_path)
    _require_inside_root(ln, Path(project_path), "PROJECT_PATH")


def resolve_artifact_key(key: str) -> Path:
    """Local path of the latest version of the artifact with this key in the current instance.

    Call ``check_instance(project_path)`` first so the project's instance is the current one.
    """
    ln = _connect()
    artifact = ln.Artifact.filter(key=key).order_by("-created_at", "-id").first()
    if artifact is None:
        raise LaminError(
            f"No artifact with key {key!r} in the lamindb instance {ln.setup.settings.instance.slug}. "
            "Register the file first (e.g. ln.Artifact(path, key=...).save()) or name it by path."
        )
    if artifact.storage.type == "local":
        path = Path(artifact.path.as_posix())
    else:
        path = Path(artifact.cache(is_run_input=False, mute=True).as_posix())
    if not path.exists():
        raise LaminError(
            f"The artifact {key!r} ({artifact.uid}) is registered at {path}, but that path does "
            "not exist. Restore the file or register it again under this key."
        )
    return path


class LaminRun:
    """One tracked run of the transform ``transform_key`` (kind ``pipeline``).

    Use as a context manager; leaving it marks the run completed (or errored, on an exception).
    Registering unchanged content again under the same key returns the existing artifact;
    changed content under a known key becomes a new version of that artifact.
    """

    def __init__(self, transform_key: str, params: dict | None = None):
        self._ln = ln = _connect()
        transform = ln.Transform.filter(key=transform_key, kind="pipeline").order_by("-created_at").first()
        if transform is None:
            transform = ln.Transform(key=transform_key, kind="pipeline").save()
        # JSON-safe copy: Paths and other objects are stored as strings
        params = json.loads(json.dumps(params, default=str)) if params else None
        self.transform = transform
        self.run = ln.Run(transform, params=params, status="started").save()

    def __enter__(self) -> LaminRun:
        return self

    def register_source(self, path: Path, key: str):
        """Artifact for a source file (or AnnData .zarr directory), marked as an input of this run."""
        artifact = self._register(path, key, "Source file", run=False)
        self.run.input_artifacts.add(artifact)
        return artifact

    def register_output(self, path: Path, key: str, inputs: list, description: str | None = None):
        """Artifact for a shard dataset directory, created by this run from ``inputs`` (artifacts).

        The inputs are added to this run's inputs, so ``artifact.run.input_artifacts`` holds them.
        An unchanged dataset returns the existing artifact, whose ``run`` is the run that first
        created it; this run is then listed in its ``recreating_runs``.
        """
        if inputs:
            self.run.input_artifacts.add(*inputs)
        artifact = self._register(path, key, "Shard dataset", run=self.run, description=description)
        if artifact.run_id != self.run.id and not artifact.recreating_runs.filter(id=self.run.id).exists():
            artifact.recreating_runs.add(self.run)
        return artifact

    def _register(self, path: Path, key: str, what: str, **kwargs):
        """The latest artifact under ``key`` if it is this path with this content, else a new one.

        Checking first keeps lamindb from logging a new version that it then discards, and lets
        a file that lamindb itself stores (under ``.lamindb/``, e.g. a key resolved by
        ``resolve_artifact_key``) be used as it is.
        """
        from lamindb_setup.core.hashing import hash_dir, hash_file

        ln = self._ln
        path = _require_inside_root(ln, path, what)
        if not path.exists():
            raise LaminError(f"{what} {path} does not exist, so it cannot be registered in lamindb.")
        stats = None
        latest = ln.Artifact.filter(key=key).order_by("-created_at", "-id").first()
        if latest is not None and latest.storage.type == "local" and Path(latest.path.as_posix()).resolve() == path:
            if path.is_dir():
                size, hash_, hash_type, n_files = hash_dir(path)
            else:
                (size, hash_, hash_type), n_files = hash_file(path), None
            if hash_ == latest.hash:
                return latest
            stats = {"size": size, "hash": hash_, "hash_type": hash_type, "n_files": n_files}
        if _lamindb_managed(ln, path):
            raise LaminError(
                f"{what} {path} is a file that lamindb manages for another artifact than {key!r}, or "
                "it changed after lamindb stored it; name that artifact by its own key, or copy "
                "the file into PROJECT_PATH and register the copy."
            )
        # _stats: the size and hash just computed, so lamindb does not read the files again
        return ln.Artifact(path, key=key, _stats=stats, **kwargs).save()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.run.finished_at = datetime.now(UTC)
        # lamindb's own codes (see Run.status): 0 completed, 1 errored, 2 aborted
        if exc_type is None:
            self.run._status_code = 0
        else:
            self.run._status_code = 2 if issubclass(exc_type, KeyboardInterrupt) else 1
        self.run.save()
