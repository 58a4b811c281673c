"""The model repository on disk, Triton's layout: ``<path>/<name>/<version>/``, which
version a server starts on, and the fingerprints whose change means a reload."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

from streamscore.server.model import ModelMetadata, latest_version, version_dirs


def check_in_place(directory: Path, metadata: ModelMetadata) -> None:
    """ValueError when a version's metadata names another model or version than the
    directory it lies in."""
    if (metadata.name, metadata.version) != (directory.parent.name, directory.name):
        raise ValueError(
            f"{directory / 'metadata.json'} describes {metadata.name} v{metadata.version}, "
            f"but lies in the directory of {directory.parent.name} v{directory.name}"
        )


class ModelRepository:
    """A directory of models and versions, Triton's layout: ``<path>/<name>/<version>/``.

    Only numeric version directories count (Triton's rule), so a staging directory
    such as ``.2.staging`` is invisible until it is renamed into place.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def models(self) -> list[str]:
        """Names of the models with at least one version."""
        if not self.path.is_dir():
            return []
        return sorted(
            p.name for p in self.path.iterdir() if p.is_dir() and version_dirs(self.path, p.name)
        )

    def versions(self, name: str) -> list[str]:
        """A model's versions, oldest first (numeric order: "2" before "10")."""
        return [p.name for p in version_dirs(self.path, name)]

    def version_path(self, name: str, version: str) -> Path:
        path = self.path / name / str(version)
        if not str(version).isdigit() or not path.is_dir():
            raise FileNotFoundError(f"no version {version!r} of model {name!r} under {self.path}")
        return path

    def metadata(self, name: str, version: str) -> ModelMetadata:
        """A version's metadata (defaults for fields an older file lacks); ValueError when
        it is malformed or names another model or version than its directory."""
        directory = self.version_path(name, version)
        metadata = ModelMetadata.load(directory / "metadata.json")
        check_in_place(directory, metadata)
        return metadata


def primary_dir(repository: Path, name: str, pinned_version: str = "") -> Path:
    """The version directory a server starts serving: the pinned version, else the
    newest. FileNotFoundError naming what is missing ("no version '9' of model ...",
    not a missing metadata.json)."""
    if pinned_version:
        return ModelRepository(repository).version_path(name, pinned_version)
    return latest_version(repository, name)


def repository_fingerprint(repository: Path, name: str, version: str = "") -> str:
    """Changes when a version directory appears or goes, or its metadata or model files
    change; of that one version's directory alone when ``version`` is given."""
    digest = hashlib.sha256()
    for directory in version_dirs(repository, name):
        if version and directory.name != version:
            continue
        metadata = directory / "metadata.json"
        digest.update(directory.name.encode())
        if metadata.is_file():
            digest.update(metadata.read_bytes())
        # A model file replaced in place (same metadata) is a new model too.
        for model_file in ("model.onnx", "model.pt"):
            with contextlib.suppress(FileNotFoundError):
                stat = (directory / model_file).stat()
                digest.update(f"{model_file}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def version_fingerprint(directory: Path) -> str:
    """``repository_fingerprint`` of the one version in ``directory``
    (<repository>/<model>/<version>)."""
    return repository_fingerprint(directory.parent.parent, directory.parent.name, directory.name)
