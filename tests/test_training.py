"""Training the sketch-side modules on pseudo-sketch pairs from a tiny real raster."""

from pathlib import Path

import numpy as np
import pytest

from worker.assets import load_asset_paths
from worker.errors import InputError
from worker.ranking import RankingConfig
from worker.store import IndexWriter, TileIndex
from worker.model.loading import load_model
from lab.pseudo_sketch import load_hand_strokes, pseudo_sketch
from worker.search import search
from worker.sketch import prepare_sketch
from worker.tiling import TileReader, TileSettings
from lab.training import BatchSampler, encode_pairs, sketch_input, train
from lab.training_pairs import PairSet, build_pairs


@pytest.fixture(scope="module")
def pairs(assets) -> PairSet:
    strokes = load_hand_strokes(Path(load_asset_paths()["lasa_dir"]))
    return build_pairs([assets["rmnp_rgb"]], windows_per_raster=16, sketches_per_window=2, hand_strokes=strokes, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pairs):
    model = load_model(device="cpu", sketch_modules="none")
    checkpoint = tmp_path_factory.mktemp("train") / "sketch_modules.safetensors"
    losses = train(model, encode_pairs(model, pairs), steps=80, seed=0, batch_places=8, lr=1e-3, checkpoint=checkpoint)
    return losses, checkpoint


def test_training_lowers_the_loss_and_writes_a_checkpoint(trained):
    losses, checkpoint = trained
    assert np.mean(losses[-15:]) < 0.8 * np.mean(losses[:15])
    assert checkpoint.exists() and checkpoint.stat().st_size < 8_000_000


def test_loading_the_checkpoint_changes_results_deterministically(trained, tmp_path, rmnp_copy):
    _, checkpoint = trained
    base = load_model(device="cpu", sketch_modules="none")
    IndexWriter(tmp_path / "index", base, TileSettings(tile=112, scales=(1,)), tokens=True).build([rmnp_copy])
    index = TileIndex.open(tmp_path / "index")
    tile = index.tile(3)
    with TileReader(tile.raster, 224) as reader:
        sketch = prepare_sketch(pseudo_sketch(reader.read(tile)[0], "simple"), 224)
    tokens = RankingConfig(ranker="tokens")  # where the sketch modules rank on their own
    key = lambda h: (round(h.placement.cx, 3), round(h.placement.cy, 3), round(h.score, 6))
    plain = [key(h) for h in search(index, base, sketch, tokens, top=5).hits]
    tuned_a = load_model(device="cpu", sketch_modules=checkpoint)
    tuned_b = load_model(device="cpu", sketch_modules=checkpoint)
    a = [key(h) for h in search(index, tuned_a, sketch, tokens, top=5).hits]
    b = [key(h) for h in search(index, tuned_b, sketch, tokens, top=5).hits]
    assert a == b
    assert a != plain
    assert tuned_a.fingerprint()["sketch_modules_id"] is not None
    assert tuned_a.tile_encoder_fingerprint() == base.tile_encoder_fingerprint()  # the index stays valid


def test_the_tokenizer_trains_through_the_frozen_backbone_from_a_saved_pair_set(pairs, tmp_path):
    """What a GPU machine does with a pair set carried to it: the multi-level tokenizer's gate
    opens, the backbone (and so every built index) is untouched, and the checkpoint carries it."""
    import torch

    pairs.save(tmp_path / "pairs.npz")
    loaded = PairSet.load(tmp_path / "pairs.npz")
    assert np.array_equal(loaded.sketches, pairs.sketches) and np.array_equal(loaded.place, pairs.place)
    model = load_model(device="cpu", sketch_modules="none")
    backbone = {k: v.clone() for k, v in model.vit.state_dict().items()}
    cache = encode_pairs(model, loaded, cache_sketch_tokens=False)
    checkpoint = tmp_path / "tok.safetensors"
    train(model, cache, steps=3, seed=0, batch_places=3, lr=1e-3, checkpoint=checkpoint)
    assert model.tokenizer.gate.abs().max() > 1e-4
    assert all(torch.equal(v, backbone[k]) for k, v in model.vit.state_dict().items())
    tuned = load_model(device="cpu", sketch_modules=checkpoint)
    assert torch.equal(tuned.tokenizer.gate, model.tokenizer.gate)
    sketch = tuned.normalise(sketch_input(torch.from_numpy(loaded.sketches[:1])))
    with torch.inference_mode():
        assert tuned.tokenizer(sketch).abs().max() > 0  # an untrained tokenizer adds exactly zero


def test_a_checkpoint_for_another_backbone_is_refused(trained):
    _, checkpoint = trained
    with pytest.raises(InputError, match="was trained for backbone"):
        load_model(device="cpu", random_weights=True, sketch_modules=checkpoint)


def test_batches_hold_the_anchor_places_layout_neighbours_and_are_reproducible():
    """Half a batch are places the layout shortlist would confuse with the anchor (here: its own
    cluster of 20 places among 10 clusters), so the re-rank learns to tell those apart."""
    import torch

    centres = torch.nn.functional.normalize(torch.randn(10, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    layouts = torch.nn.functional.normalize(centres.repeat_interleave(20, 0) + 0.05 * torch.randn(200, 64), dim=1)
    cluster = torch.arange(200) // 20
    a, b = BatchSampler(layouts, 16, seed=3, near=19), BatchSampler(layouts, 16, seed=3, near=19)
    for _ in range(20):
        places = a()
        assert torch.equal(places, b()) and len(set(places.tolist())) == 16
        assert (cluster[places] == cluster[places[0]]).sum() >= 8  # random batches: about 1.6
