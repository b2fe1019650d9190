"""Official Mask2Former (+ offset learning) checkpoints (Swin) → transformers folders, and their golden parity.

The reduced golden models (``tests/fixtures/mask2former-swin[-offset]-small_*``, from the official mmseg / mmdet code;
golden README "Mask2Former (Swin) + offset learning") are converted from their official-layout state dicts and must
reproduce every stored tensor at both stored input sizes: the Swin maps and the pixel decoder's outputs within 1e-5
(measured ≤ 4.5e-6), the class scores, masks and the semantic map within 1e-4 (measured ≤ 3.4e-6, ≤ 2.4e-5 and
≤ 1.7e-5). The masks need no looser tolerance than the logits because no attention-mask bit flips: the binary masks
that each stage hands to the next decoder layer are recomputed from our masks and from the reference's and compared
bit for bit (:func:`test_no_attention_mask_bit_flips`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

from offseg_hf.cli import main
from offseg_hf.conversion.accounting import ConversionError
from offseg_hf.conversion.convert import convert_any_checkpoint
from offseg_hf.conversion.mask2former import (
    convert_mask2former_state_dict,
    mask2former_config_from_state_dict,
    merge_order,
    model_class_for,
)
from offseg_hf.models.modeling_mask2former_offset import Mask2FormerOffsetForUniversalSegmentation, mask2former_swin_config
from offseg_hf.inference.image_processing_offseg import Mask2FormerSemanticImageProcessor

pytestmark = pytest.mark.torch_threads(1)

MODELS = ("mask2former-swin-offset-small", "mask2former-swin-small")
INPUTS = ("b2_128x128.", "b1_96x160.")
NUM_STAGES = 4  # the initial prediction + 3 decoder layers
UNUSED_SWIN_NORM = "model.pixel_level_module.encoder.swin.layernorm."


def reference_semantic_logits(class_logits: torch.Tensor, mask_logits: torch.Tensor, size) -> torch.Tensor:
    """The reference ``predict`` on an unpadded input: softmax over K+1 classes, no-object dropped, sigmoid masks
    resized to the input, their product `(B, K, H, W)`."""
    masks = torch.nn.functional.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False).sigmoid()
    return torch.einsum("bqc,bqhw->bchw", class_logits.softmax(-1)[..., :-1], masks)


def attention_mask_bits(mask_logits: torch.Tensor, size) -> torch.Tensor:
    """The binary cross-attention mask a stage's masks give the next decoder layer (True = not attended)."""
    resized = torch.nn.functional.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    return resized.sigmoid() < 0.5


@pytest.fixture(scope="module", params=MODELS)
def golden_run(request, fixtures_dir):
    """(name, model, golden tensors, our tensors under the golden names) for both inputs of one reduced model."""
    name = request.param
    state_dict = load_file(fixtures_dir / f"{name}_official.safetensors")
    golden = load_file(fixtures_dir / f"{name}_io.safetensors")
    config, weights, dropped = convert_mask2former_state_dict(state_dict)
    model = model_class_for(config)(config).eval()
    model.load_state_dict(weights, strict=True)
    predictor = model.model.transformer_module.decoder.mask_predictor
    ours = {}
    for prefix in INPUTS:
        captured = {"normed_query": [], "mask_embed": [], "pixels": []}

        def predictor_inputs(module, args, output):  # (Q, B, C) normed queries, (B, C, H, W) pixel embeddings
            captured["normed_query"].append(args[0].transpose(0, 1))
            captured["pixels"].append(args[1])

        def mask_embeddings(module, args, output):
            captured["mask_embed"].append(output)

        hooks = [predictor.register_forward_hook(predictor_inputs),
                 predictor.mask_embedder.register_forward_hook(mask_embeddings)]
        pixel_values = golden[prefix + "pixel_values"]
        with torch.no_grad():
            out = model(pixel_values, output_hidden_states=True, output_auxiliary_logits=True)
        for hook in hooks:
            hook.remove()
        for level in range(4):
            ours[f"{prefix}backbone.{level}"] = out.encoder_hidden_states[level]
        ours[f"{prefix}pixel_decoder.mask_features"] = out.pixel_decoder_last_hidden_state
        for level in range(3):
            ours[f"{prefix}pixel_decoder.multi_scale_features.{level}"] = out.pixel_decoder_hidden_states[level]
        stages = [*out.auxiliary_logits, {"class_queries_logits": out.class_queries_logits,
                                          "masks_queries_logits": out.masks_queries_logits}]
        assert len(stages) == NUM_STAGES
        for stage, logits in enumerate(stages):
            ours[f"{prefix}decoder.cls_scores.{stage}"] = logits["class_queries_logits"]
            ours[f"{prefix}decoder.mask_preds.{stage}"] = logits["masks_queries_logits"]
            ours[f"{prefix}decoder.normed_query.{stage}"] = captured["normed_query"][stage]
            ours[f"{prefix}decoder.mask_embed.{stage}"] = captured["mask_embed"][stage]
            if isinstance(model, Mask2FormerOffsetForUniversalSegmentation):
                with torch.no_grad():
                    aligned, _ = predictor.offset_learning.align(captured["pixels"][stage], captured["mask_embed"][stage])
                ours[f"{prefix}decoder.aligned_mask_embed.{stage}"] = aligned
        ours[f"{prefix}seg_logits"] = reference_semantic_logits(
            out.class_queries_logits, out.masks_queries_logits, pixel_values.shape[-2:]
        )
    return name, model, dropped, golden, ours


def _tolerance(key: str) -> float:
    return 1e-5 if ".backbone." in f".{key}" or ".pixel_decoder." in key else 1e-4


def test_every_golden_tensor_is_reproduced(golden_run):
    name, model, dropped, golden, ours = golden_run
    expected_type = Mask2FormerOffsetForUniversalSegmentation if "offset" in name else Mask2FormerForUniversalSegmentation
    assert type(model) is expected_type
    assert sorted(dropped) == sorted(k for k in load_file_keys(name) if k.endswith("relative_position_index"))
    compared = [key for key in golden if not key.endswith("pixel_values")]
    assert sorted(compared) == sorted(ours), "every stored tensor is compared, nothing else"
    failures = []
    for key in compared:
        assert ours[key].shape == golden[key].shape, key
        difference = (ours[key] - golden[key]).abs().max().item()
        if difference > _tolerance(key):
            failures.append(f"{key}: {difference:.3g} > {_tolerance(key)}")
    assert not failures, failures
    for prefix in INPUTS:  # the semantic map, as the arg-max the evaluation uses
        assert torch.equal(ours[prefix + "seg_logits"].argmax(1), golden[prefix + "seg_logits"].argmax(1))


def load_file_keys(name: str) -> list[str]:
    return list(load_file(Path(__file__).parent / "fixtures" / f"{name}_official.safetensors"))


def test_no_attention_mask_bit_flips(golden_run):
    """Every stage's masks give the next decoder layer exactly the reference's binary attention mask.

    Stage s's masks are resized to the size of pixel-decoder level s % 3 (stage 0 → 1/32, 1 → 1/16, 2 → 1/8), as
    the decoder does; the smallest distance of a resized logit from the threshold is asserted to exceed our own
    error on the masks, so the agreement is not luck of the draw.
    """
    name, model, dropped, golden, ours = golden_run
    for prefix in INPUTS:
        for stage in range(NUM_STAGES - 1):
            size = golden[f"{prefix}pixel_decoder.multi_scale_features.{stage % 3}"].shape[-2:]
            reference = golden[f"{prefix}decoder.mask_preds.{stage}"]
            ours_bits = attention_mask_bits(ours[f"{prefix}decoder.mask_preds.{stage}"], size)
            assert torch.equal(ours_bits, attention_mask_bits(reference, size)), f"{name} {prefix} stage {stage}"
            resized = torch.nn.functional.interpolate(reference, size=size, mode="bilinear", align_corners=False)
            error = (ours[f"{prefix}decoder.mask_preds.{stage}"] - reference).abs().max().item()
            assert resized.abs().min().item() > error


@pytest.mark.parametrize("name", ["mask2former-swin-t-offset", "mask2former-swin-t"])
def test_full_swin_t_key_lists_are_consumed(name, fixtures_dir):
    """Every key of the full official Swin-T models maps (shapes checked against our model), none is left over."""
    keys = json.loads((fixtures_dir / f"{name}_official_keys.json").read_text())
    window = 7
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
    index = relative[..., 0] * (2 * window - 1) + relative[..., 1]  # the original Swin formula, (49, 49)
    state_dict = {
        key: index.clone() if key.endswith("relative_position_index") else torch.empty(shape, device="meta")
        for key, shape in keys
    }
    config, converted, dropped = convert_mask2former_state_dict(state_dict)  # raises on any unmapped / missing key
    assert config.model_type == ("mask2former_offset" if name.endswith("offset") else "mask2former")
    swin = config.backbone_config
    assert (swin.embed_dim, list(swin.depths), list(swin.num_heads), swin.window_size) == (96, [2, 2, 6, 2], [3, 6, 12, 24], 7)
    assert (config.num_labels, config.num_queries, config.hidden_dim, config.decoder_layers, config.encoder_layers) == (150, 100, 256, 10, 6)
    assert dropped == [key for key, _ in keys if key.endswith("relative_position_index")] and len(dropped) == 12
    provided = {key for key in converted if key.startswith(UNUSED_SWIN_NORM) or key == "criterion.empty_weight"}
    assert provided == {UNUSED_SWIN_NORM + "weight", UNUSED_SWIN_NORM + "bias", "criterion.empty_weight"}
    # 24 Swin qkv and 18 decoder self-attention in_proj tensors each become 3
    assert len(converted) - len(provided) == len(keys) - len(dropped) + 2 * 24 + 2 * 18
    bad = dict(state_dict)
    bad["decode_head.mystery.weight"] = torch.empty(3, device="meta")
    del bad["decode_head.transformer_decoder.post_norm.bias"]
    with pytest.raises(ConversionError) as error:
        convert_mask2former_state_dict(bad)
    assert "'decode_head.mystery.weight'" in str(error.value)
    assert "model.transformer_module.decoder.layernorm.bias" in str(error.value)


@pytest.mark.parametrize(("offset_learning", "expected"), [(True, 47_570_705), (False, 47_439_633)])
def test_parameter_counts_of_the_full_models(offset_learning, expected):
    """The reference's counts (golden README; paper Table 5: 47.6 M / 47.4 M), transformers' Swin as backbone.

    transformers' ``SwinBackbone`` also holds ``SwinModel``'s final LayerNorm (2·768), which it never applies
    (:func:`test_unused_swin_layernorm_gets_no_gradient`); the reference has no such module.
    """
    config = mask2former_swin_config("swin-t", num_labels=150, offset_learning=offset_learning)
    with torch.device("meta"):
        model = model_class_for(config)(config)
    named = dict(model.named_parameters())
    unused = sum(p.numel() for key, p in named.items() if key.startswith(UNUSED_SWIN_NORM))
    assert unused == 2 * 768
    assert sum(p.numel() for p in named.values()) - unused == expected
    offset = sum(p.numel() for key, p in named.items() if ".offset_learning." in key)
    assert offset == (2 * 256 * 256 if offset_learning else 0)


def test_unused_swin_layernorm_gets_no_gradient(fixtures_dir):
    config, weights, _ = convert_mask2former_state_dict(
        load_file(fixtures_dir / "mask2former-swin-offset-small_official.safetensors")
    )
    model = model_class_for(config)(config).train()
    model.load_state_dict(weights)
    out = model(torch.randn(1, 3, 64, 64))
    (out.class_queries_logits.sum() + out.masks_queries_logits.sum()).backward()
    grads = {key: p.grad for key, p in model.named_parameters()}
    assert all(grads[key] is None for key in grads if key.startswith(UNUSED_SWIN_NORM))
    assert grads["model.pixel_level_module.encoder.hidden_states_norms.stage4.weight"] is not None


def test_merge_order_matches_transformers_patch_merging():
    """Our permutation of mmseg's nn.Unfold channel order gives transformers' patch-merging input exactly."""
    channels, x = 3, torch.randn(1, 4, 6, 3)  # (B, H, W, C)
    unfolded = torch.nn.functional.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)  # mmseg
    ours = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).reshape(1, -1, 4 * channels)
    weight = torch.randn(2 * channels, 4 * channels)
    torch.testing.assert_close(ours @ merge_order(weight).T, unfolded @ weight.T, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def official_checkpoints(fixtures_dir, tmp_path_factory):
    """The reduced golden weights saved with torch.save like an mmseg checkpoint (``state_dict`` + ``meta``)."""
    root = tmp_path_factory.mktemp("m2f-official")
    paths = {}
    for name in MODELS:
        paths[name] = root / f"{name}.pth"
        torch.save({"state_dict": load_file(fixtures_dir / f"{name}_official.safetensors"),
                    "meta": {"mmseg_version": "1.2.2"}}, paths[name])
    return paths


@pytest.mark.parametrize("name", MODELS)
def test_offseg_convert_writes_a_verified_folder_that_computes_the_reference(name, official_checkpoints, fixtures_dir,
                                                                              tmp_path, capsys):
    folder = tmp_path / "converted"
    assert main(["convert", str(official_checkpoints[name]), str(folder), "--verify", "--verify-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "cityscapes (19 classes)" in printed and "verified: max weight difference 0, max logits difference 0" in printed
    offset = "offset" in name
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder left"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == ("mask2former_offset" if offset else "mask2former")
    assert config["id2label"]["0"] == "road" and config["id2label"]["18"] == "bicycle"
    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(processor) is Mask2FormerSemanticImageProcessor  # the reference's padding and semantic prediction
    assert (processor.do_pad, processor.size_divisor, processor.do_reduce_labels) == (True, 32, False)
    assert dict(processor.size) == {"shortest_edge": 1024, "longest_edge": 2048}  # Cityscapes' test resize
    card = (folder / "README.md").read_text()
    assert ("with offset learning" in card) == offset and f"`{name}.pth`" in card and "2,8" in card

    import offseg_hf  # noqa: F401  (activates mask2former_offset with the Auto classes)
    from transformers import AutoModelForUniversalSegmentation

    model = AutoModelForUniversalSegmentation.from_pretrained(folder).eval()
    assert type(model) is (Mask2FormerOffsetForUniversalSegmentation if offset else Mask2FormerForUniversalSegmentation)
    golden = load_file(fixtures_dir / f"{name}_io.safetensors")
    pixel_values = golden["b1_96x160.pixel_values"]
    with torch.no_grad():
        out = model(pixel_values)
    torch.testing.assert_close(out.class_queries_logits, golden["b1_96x160.decoder.cls_scores.3"], rtol=0, atol=1e-4)
    torch.testing.assert_close(reference_semantic_logits(out.class_queries_logits, out.masks_queries_logits, (96, 160)),
                               golden["b1_96x160.seg_logits"], rtol=0, atol=1e-4)


def test_detection_and_dataset_choice(official_checkpoints, tmp_path):
    result = convert_any_checkpoint(official_checkpoints["mask2former-swin-offset-small"], tmp_path / "out")
    assert (result.preset, result.dataset, result.num_labels) == ("mask2former-swin-32-2-2-2-2-offset", "cityscapes", 19)
    with pytest.raises(ConversionError, match="19 classes"):
        convert_any_checkpoint(official_checkpoints["mask2former-swin-small"], tmp_path / "ade", dataset="ade20k")
    assert not (tmp_path / "ade").exists()


def _swin_under_upernet(state_dict):
    head = {key: value for key, value in state_dict.items() if not key.startswith("decode_head.")}
    head["decode_head.psp_modules.0.1.conv.weight"] = torch.zeros(8, 256, 1, 1)
    head["decode_head.fpn_convs.0.conv.weight"] = torch.zeros(8, 8, 3, 3)
    return head


def _mask2former_on_resnet(state_dict):
    model = {key: value for key, value in state_dict.items() if not key.startswith("backbone.")}
    model["backbone.conv1.weight"] = torch.zeros(64, 3, 7, 7)
    model["backbone.layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    return model


@pytest.mark.parametrize(("make", "found"), [(_swin_under_upernet, "UPerNet"), (_mask2former_on_resnet, "ResNet")])
def test_unsupported_head_or_backbone_is_refused_and_leaves_nothing(make, found, fixtures_dir, tmp_path, capsys):
    state_dict = make(load_file(fixtures_dir / "mask2former-swin-small_official.safetensors"))
    checkpoint = tmp_path / "other.pth"
    torch.save({"state_dict": state_dict, "meta": {}}, checkpoint)
    target = tmp_path / "nested" / "out"
    assert main(["convert", str(checkpoint), str(target)]) == 1
    message = capsys.readouterr().err
    assert "unsupported Mask2Former / Swin checkpoint" in message and found in message and str(checkpoint) in message
    assert "Traceback" not in message
    assert not (tmp_path / "nested").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pth"]


def test_config_from_state_dict_reads_the_reduced_architecture(fixtures_dir):
    config = mask2former_config_from_state_dict(load_file(fixtures_dir / "mask2former-swin-offset-small_official.safetensors"))
    swin = config.backbone_config
    assert (swin.embed_dim, list(swin.depths), list(swin.num_heads), swin.window_size, swin.mlp_ratio) == (32, [2, 2, 2, 2], [1, 2, 4, 8], 7, 4.0)
    assert (config.hidden_dim, config.feature_size, config.mask_feature_size, config.num_queries) == (64, 64, 64, 20)
    assert (config.encoder_layers, config.encoder_feedforward_dim, config.decoder_layers, config.dim_feedforward) == (3, 256, 4, 512)
    assert (config.num_attention_heads, config.num_labels) == (8, 19)


def test_push_to_hub_uploads_the_converted_folder(official_checkpoints, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from hub_stand_in import LocalHub

    out = tmp_path / "m2f"
    with LocalHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", "hf_stand_in_token")
        status = main(["convert", str(official_checkpoints["mask2former-swin-offset-small"]), str(out),
                       "--push-to-hub", "someone/m2f-offset", "--private"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    repo = hub.repos["someone/m2f-offset"]
    assert repo.private and set(repo.files) == {p.name for p in out.iterdir()}
    assert "Mask2Former" in repo.commits[0] and "uploaded:" in printed.out
    assert b"mask2former" in repo.files["README.md"] and json.loads(repo.files["config.json"])["model_type"] == "mask2former_offset"


def test_detectron2_mask2former_layout_is_named(tmp_path):
    checkpoint = tmp_path / "model_final.pth"
    torch.save({"model": None, "state_dict": {
        "backbone.layers.0.blocks.0.attn.qkv.weight": torch.zeros(288, 96),
        "sem_seg_head.predictor.query_feat.weight": torch.zeros(100, 256),
    }}, checkpoint)
    with pytest.raises(ConversionError, match="detectron2 .*mmsegmentation's layout of Mask2Former"):
        convert_any_checkpoint(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dataset", ["ade20k", "cityscapes", "coco-stuff", "pascal-context"])
def test_processor_is_the_reference_test_pipeline(dataset):
    """The Mask2Former folders' processor resizes and normalises exactly as OffSeg's (tested against mmcv and the
    reference normalisation in test_image_processing.py) for an image already at the protocol's short side, then
    zero-pads bottom / right to a multiple of 32 (``SegDataPreProcessor(size_divisor=32)``), and reduces labels as
    the dataset needs."""
    import numpy as np
    from PIL import Image

    from offseg_hf.data.registry import get_dataset_info
    from offseg_hf.inference.image_processing_offseg import Mask2FormerSemanticImageProcessor, build_image_processor
    from offseg_hf.inference.segment import get_protocol

    short = min(get_protocol(dataset).scale)
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((short, short + 13, 3)) * 255).astype(np.uint8))
    processor = build_image_processor(dataset, model_type="mask2former_offset")
    assert type(processor) is Mask2FormerSemanticImageProcessor
    ours = processor(image, return_tensors="pt")["pixel_values"]
    offseg = build_image_processor(dataset)(image, return_tensors="pt")["pixel_values"]
    height, width = offseg.shape[-2:]
    assert ours.shape[-2:] == (-(-height // 32) * 32, -(-width // 32) * 32)
    torch.testing.assert_close(ours[..., :height, :width], offseg, rtol=0, atol=0)
    assert not ours[..., height:, :].any() and not ours[..., width:].any()
    assert processor.do_reduce_labels == get_dataset_info(dataset).reduce_labels


def test_transformers_semantic_post_processing_differs_from_the_reference(golden_run):
    """What README "Reference differences" states: transformers' post-processing (masks resized to 384×384 first)
    is not the reference's ``predict``. Its scores agree within 1e-4 on the square 128×128 input (384 = 3·128) and
    differ by more than 0.05 on 96×160, whose aspect ratio the square distorts; the label maps agree on these inputs."""
    name, model, dropped, golden, ours = golden_run
    processor = Mask2FormerImageProcessor()
    for prefix, differs in (("b2_128x128.", False), ("b1_96x160.", True)):
        size = tuple(golden[prefix + "pixel_values"].shape[-2:])
        outputs = type("Outputs", (), {"class_queries_logits": ours[f"{prefix}decoder.cls_scores.3"],
                                       "masks_queries_logits": ours[f"{prefix}decoder.mask_preds.3"]})()
        theirs = processor.post_process_semantic_segmentation(
            outputs, target_sizes=[size] * golden[prefix + "pixel_values"].shape[0], return_segmentation_scores=True
        )
        scores = torch.stack([item.segmentation_scores for item in theirs])
        difference = (scores - golden[prefix + "seg_logits"]).abs().max().item()
        assert (difference > 0.05) if differs else (difference < 1e-4), f"{name} {prefix}: {difference:.3g}"
        labels = torch.stack([item.segmentation for item in theirs])
        assert torch.equal(labels, golden[prefix + "seg_logits"].argmax(1))


FRESH_PROCESS = r"""
import json, sys
import numpy as np
from PIL import Image
import offseg_hf  # nothing else: the Auto classes, the pipeline and the processor must know the folder now
from transformers import pipeline

folder, image_path, out = sys.argv[1:4]
segmenter = pipeline("image-segmentation", model=folder)
image = Image.open(image_path)
label_map = np.full((image.height, image.width), -1, dtype=np.int64)
for segment in segmenter(image):
    label_map[np.array(segment["mask"]) > 0] = segmenter.model.config.label2id[segment["label"]]
np.save(f"{out}/pipeline.npy", label_map)
from offseg_hf.cli import main
predicted = main(["predict", image_path, "--model", folder, "--out", f"{out}/predictions", "--quiet"])
evaluated = main(["evaluate", "--model", folder, "--dataset", "synthetic", "--num-labels", "19", "--eval-samples", "2",
                  "--image-size", "64", "--output-dir", f"{out}/evaluation", "--quiet"])
print("RESULT", json.dumps([type(segmenter.model).__module__, type(segmenter.image_processor).__name__, predicted, evaluated]))
"""


def test_converted_folder_predicts_evaluates_and_segments_after_a_bare_import(official_checkpoints, tmp_path):
    """The acceptance path of a new user, in a fresh interpreter with stdin closed: `offseg convert` of an
    official-layout file, then ``import offseg_hf`` alone, then ``pipeline("image-segmentation")``, ``offseg predict``
    and ``offseg evaluate --dataset synthetic`` on the folder: no remote code, and the pipeline's label map is the
    one ``offseg predict`` writes (both the reference's semantic prediction)."""
    import os
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from offseg_hf.inference.predict import label_map_from_png

    folder = tmp_path / "m2f-offset"
    assert main(["convert", str(official_checkpoints["mask2former-swin-offset-small"]), str(folder), "--quiet"]) == 0
    image_path = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (72, 100, 3), dtype=np.uint8)).save(image_path)
    repo = Path(__file__).resolve().parent.parent
    completed = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(folder), str(image_path), str(tmp_path)], capture_output=True,
        text=True, timeout=600, stdin=subprocess.DEVNULL, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"},
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    assert "trust_remote_code" not in output and "is not supported for" not in output, output[-3000:]
    module, processor, predicted, evaluated = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    assert module == "offseg_hf.models.modeling_mask2former_offset" and processor == "Mask2FormerSemanticImageProcessor"
    assert (predicted, evaluated) == (0, 0)
    pipeline_map = np.load(tmp_path / "pipeline.npy")
    assert (pipeline_map >= 0).all()
    np.testing.assert_array_equal(pipeline_map, label_map_from_png(tmp_path / "predictions" / "scene_labels.png"))
    results = json.loads(next((tmp_path / "evaluation").glob("eval_*.json")).read_text())
    assert 0.0 <= results["metrics"]["mIoU"] <= 1.0
