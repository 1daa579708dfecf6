"""The index on disk: format (layout, version, compatibility), writer, reader, GeoPackage of tiles."""

from worker.store.format import (CHUNK_TILES, FORMAT_VERSION, JOB_FILE, MANIFEST, TILES_LAYER, check_compatible,
                                 check_index_folder, check_tokens, read_manifest, write_json_atomic)
from worker.store.reader import WGS84, TileIndex
from worker.store.writer import IndexProgress, IndexWriter

__all__ = ["CHUNK_TILES", "FORMAT_VERSION", "JOB_FILE", "MANIFEST", "TILES_LAYER", "WGS84", "IndexProgress",
           "IndexWriter", "TileIndex", "check_compatible", "check_index_folder", "check_tokens", "read_manifest",
           "write_json_atomic"]
