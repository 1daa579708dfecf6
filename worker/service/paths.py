"""Which paths a client may name: index names inside the index root, rasters inside raster roots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wire.protocol import excerpt
from worker.errors import ForbiddenError, InputError
from worker.raster_access import RasterAccess

MAX_NAME_CHARS = 1024
MAX_PART_CHARS = 255  # a folder name, as file systems allow
TRASH_PREFIX = ".deleted-"  # an index being removed, in its index root (worker.service.indexes.OpenIndexes.delete)


@dataclass(frozen=True)
class PathPolicy:
    index_roots: tuple[Path, ...]
    raster_roots: tuple[Path, ...]

    def index_dir(self, name: str) -> Path:
        """An index name (a relative path like "coast/2024") -> its folder inside the first
        index root: never the root itself, never outside it (links resolved)."""
        if not name or len(name) > MAX_NAME_CHARS or any(ord(c) < 32 or c == "\x7f" for c in name):
            raise InputError(f"index name {excerpt(name)} must be 1 to {MAX_NAME_CHARS} characters without control "
                             "characters")
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or name.startswith("~"):
            raise ForbiddenError(f"index name {excerpt(name)} must be a relative path without '..' or '~'")
        if any(len(part.encode()) > MAX_PART_CHARS for part in parts):
            raise InputError(f"index name {excerpt(name)} has a folder name longer than {MAX_PART_CHARS} bytes")
        # an index in such a folder was never listed, and removed with the trash at the next delete
        if any(part.startswith(TRASH_PREFIX) for part in parts):
            raise InputError(f"index name {excerpt(name)}: folder names beginning {TRASH_PREFIX!r} are the "
                             "worker's own (indexes being deleted)")
        root = self.index_root
        path = (root / name).resolve()
        if path == root:
            raise ForbiddenError(f"index name {excerpt(name)} names the index root itself: name an index inside it")
        if not path.is_relative_to(root):
            raise ForbiddenError(f"index name {excerpt(name)} leaves the index root")
        return path

    def index_name(self, index_dir: Path) -> str:
        """The name a client uses for an index directory of the first index root."""
        return str(index_dir.resolve().relative_to(self.index_root))

    @property
    def index_root(self) -> Path:
        """Where named indexes live (the first index root; the others are only resumed from)."""
        return self.index_roots[0].resolve()

    @property
    def raster_access(self) -> RasterAccess:
        """What a client's indexing request may read: files inside the raster roots only."""
        return RasterAccess(tuple(r.resolve() for r in self.raster_roots))
