"""Which paths a client may name: index names inside index roots, rasters inside raster roots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wire.errors import FORBIDDEN, ProtocolError


@dataclass(frozen=True)
class PathPolicy:
    index_roots: tuple[Path, ...]
    raster_roots: tuple[Path, ...]

    def index_dir(self, name: str) -> Path:
        """An index name (a relative path like "coast/2024") inside the first index root."""
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or name.startswith("~"):
            raise ProtocolError(FORBIDDEN, f"index name {name!r} must be a relative path without '..'")
        root = self.index_root
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            raise ProtocolError(FORBIDDEN, f"index name {name!r} leaves the index root")
        return path

    def index_name(self, index_dir: Path) -> str:
        """The name a client uses for an index directory of the first index root."""
        return str(index_dir.resolve().relative_to(self.index_root))

    @property
    def index_root(self) -> Path:
        """Where named indexes live (the first index root; the others are only resumed from)."""
        return self.index_roots[0].resolve()

    def raster(self, path: str) -> Path:
        """A raster path, accepted only inside a raster root (after resolving links and '..')."""
        resolved = Path(path).expanduser().resolve()
        if not any(resolved.is_relative_to(r.resolve()) for r in self.raster_roots):
            roots = ", ".join(str(r) for r in self.raster_roots)
            raise ProtocolError(FORBIDDEN, f"{path} is outside the raster roots this worker serves ({roots})")
        return resolved
