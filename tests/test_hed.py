"""The HED edge detector ported from the Keras BSDS500 weights finds real edges."""

import numpy as np
import torch

from worker.line_drawing import edge_map
from lab.hed import load_hed
from lab.pseudo_sketch import pseudo_sketch
from worker.tiling import TileReader, TileSettings, open_raster, plan_tiles


def test_hed_edge_probability_is_high_on_image_edges(assets):
    hed = load_hed(assets["hed_weights"])
    info = open_raster(assets["s2_rgb"], None)
    tile = plan_tiles(info, TileSettings(scales=(1,)))[40]
    with TileReader(info, 224) as reader:
        image = reader.read(tile)[0]
    with torch.inference_mode():
        prob = hed(torch.from_numpy(image)[None])[0].numpy()
    assert prob.shape == (224, 224) and 0.0 <= prob.min() and prob.max() <= 1.0
    edges = edge_map(image, 2.0)
    assert prob[edges].mean() > 2 * prob[~edges].mean()  # a broken port gives noise or a constant
    flat = np.full_like(image, 128)
    with torch.inference_mode():
        assert hed(torch.from_numpy(flat)[None]).max() < prob.max()  # nothing to see in a flat tile
    drawing = np.asarray(pseudo_sketch(image, "hed", hed=hed))
    assert 0.005 < (drawing < 128).mean() < 0.3
