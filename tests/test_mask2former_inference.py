"""Mask2Former (+ offset learning) semantic inference = the reference's ``Mask2FormerHead.predict``.

The reference (mmsegmentation's Mask2Former test path): zero-pad the normalised input to a multiple of 32, run the
network, resize the last stage's mask logits bilinearly to the padded size, ``softmax`` over the K + 1 classes without
the no-object class times ``sigmoid(masks)`` summed over queries, crop the padding, resize to the image, arg-max.
``reference_scores`` below writes that out with plain torch ops; ``offseg_hf.segment`` (whole / slide), the image
processor's post-processing (what ``pipeline`` calls), ``offseg predict`` and the demo must agree with it.
A tiny randomly initialised model (``save_pretrained``) stands in for a converted folder.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

import offseg_hf.inference.image_processing_offseg  # noqa: F401  (registers the processor by name, until `import offseg_hf` does)
import offseg_hf  # noqa: F401  (activates the models with the Auto classes)
from offseg_hf.inference.image_processing_offseg import Mask2FormerSemanticImageProcessor, build_image_processor
from offseg_hf.inference.segment import SegmentationProtocol, segment_image
from offseg_hf.models import Mask2FormerOffsetConfig, Mask2FormerOffsetForUniversalSegmentation

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
NUM_LABELS = 5
# keep-ratio resize to short side 80 / long side <= 128: a 75x100 image becomes 80x107 (mmcv rounding; transformers
# would truncate to 106), padded to 96x128
SCALE = (128, 80)


def tiny_config(offset: bool = True, num_labels: int = NUM_LABELS):
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7, drop_path_rate=0.0,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    fields = dict(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_layers=1,
                  encoder_feedforward_dim=64, decoder_layers=3, num_attention_heads=2, dim_feedforward=64,
                  num_queries=8, train_num_points=256, num_labels=num_labels,
                  id2label={i: f"class{i}" for i in range(num_labels)},
                  label2id={f"class{i}": i for i in range(num_labels)})
    return Mask2FormerOffsetConfig(**fields) if offset else Mask2FormerConfig(**fields)


def tiny_model(offset: bool = True):
    torch.manual_seed(0)
    model_class = Mask2FormerOffsetForUniversalSegmentation if offset else Mask2FormerForUniversalSegmentation
    model = model_class(tiny_config(offset)).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # spread the class scores and the masks: the maps then hold several classes
        model.class_predictor.weight.normal_(0, 3.0, generator=generator)
        model.class_predictor.bias.zero_()
        model.model.pixel_level_module.decoder.mask_projection.weight.normal_(0, 0.5, generator=generator)
        mask_head = model.get_submodule("model.transformer_module.decoder.mask_predictor.mask_embedder.2.0")
        mask_head.weight.normal_(0, 1.0, generator=generator)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["offset", "plain"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("m2f-offset" if request.param else "m2f-plain")
    tiny_model(request.param).save_pretrained(path)
    build_image_processor("ade20k", scale=SCALE, model_type="mask2former").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((100, 75), Image.BILINEAR)  # smooth enough for regions, 75x100


def reference_scores(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Mask2FormerHead.predict + the crop of EncoderDecoder.postprocess_result, literally: (B, K, h, w)."""
    height, width = pixel_values.shape[-2:]
    padded = F.pad(pixel_values, (0, -width % 32, 0, -height % 32))
    with torch.no_grad():
        outputs = model(pixel_values=padded)
    masks = F.interpolate(outputs.masks_queries_logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
    scores = torch.einsum("bqc,bqhw->bchw", outputs.class_queries_logits.softmax(-1)[..., :-1], masks.sigmoid())
    return scores[..., :height, :width]


def load(folder):
    from offseg_hf.inference.predict import load_model

    return load_model(str(folder), device="cpu")


@pytest.mark.parametrize("name", ["mask2former-swin-offset-small", "mask2former-swin-small"])
def test_scores_reproduce_the_reference_seg_logits(name):
    """The official head's own ``predict`` output (golden ``seg_logits``) from its last-stage class scores and masks."""
    from safetensors.torch import load_file

    from offseg_hf.inference.segment import mask_classification_scores

    io = load_file(FIXTURES / f"{name}_io.safetensors")
    processor = build_image_processor("ade20k", model_type="mask2former_offset")
    for prefix in ("b2_128x128.", "b1_96x160."):
        size = tuple(io[f"{prefix}pixel_values"].shape[-2:])
        classes, masks = io[f"{prefix}decoder.cls_scores.3"], io[f"{prefix}decoder.mask_preds.3"]
        reference = io[f"{prefix}seg_logits"]
        for index in range(len(reference)):
            scores = mask_classification_scores(classes[index], masks[index], size, size)
            torch.testing.assert_close(scores, reference[index], atol=1e-5, rtol=0)

        class Outputs:  # what the model returns, for the image processor's post-processing
            class_queries_logits, masks_queries_logits = classes, masks

        maps = processor.post_process_semantic_segmentation(Outputs(), target_sizes=[size] * len(reference),
                                                            input_sizes=[size] * len(reference))
        for label_map, scores in zip(maps, reference):
            assert torch.equal(label_map, scores.argmax(0)), prefix


def test_whole_mode_is_the_reference_predict(folder, image):
    model, processor = load(folder)
    assert isinstance(processor, Mask2FormerSemanticImageProcessor)
    protocol = SegmentationProtocol(scale=SCALE, crop_size=(64, 64), stride=(48, 48))
    pixel_values = processor(images=image, return_tensors="pt", do_pad=False)["pixel_values"]
    assert tuple(pixel_values.shape) == (1, 3, 80, 107)  # mmcv's rounding of 106.67
    scores = reference_scores(model, pixel_values)
    expected = F.interpolate(scores, size=(75, 100), mode="bilinear", align_corners=False)[0].argmax(0)
    result = segment_image(model, processor, image, mode="whole", protocol=protocol)
    counts = expected.unique(return_counts=True)[1]
    assert len(counts) >= 2 and counts.min() >= 0.05 * expected.numel(), "the tiny model should predict several classes"
    assert torch.equal(result.label_map, expected)

    # the padding matters: the same network on the unpadded input gives other scores
    with torch.no_grad():
        unpadded = model(pixel_values=pixel_values)
    masks = F.interpolate(unpadded.masks_queries_logits, size=(80, 107), mode="bilinear", align_corners=False)
    plain = torch.einsum("bqc,bqhw->bchw", unpadded.class_queries_logits.softmax(-1)[..., :-1], masks.sigmoid())
    assert (plain - scores).abs().max() > 1e-3


def test_post_processing_is_the_reference_and_pipeline_equals_segment(folder, image):
    from transformers import pipeline

    model, processor = load(folder)
    inputs = processor(images=image, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 96, 128)  # padded to multiples of 32, zeros
    assert torch.equal(inputs["pixel_values"][..., 80:, :], torch.zeros(1, 3, 16, 128))
    with torch.no_grad():
        outputs = model(**inputs)
    post = processor.post_process_semantic_segmentation(outputs, target_sizes=[(75, 100)], return_segmentation_scores=True)[0]
    expected = F.interpolate(reference_scores(model, inputs["pixel_values"][..., :80, :107]), size=(75, 100),
                             mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(post["segmentation_scores"], expected, atol=1e-5, rtol=0)
    assert torch.equal(post["segmentation"], expected.argmax(0))

    segmenter = pipeline("image-segmentation", model=str(folder))
    assert type(segmenter.image_processor).__name__ == "Mask2FormerSemanticImageProcessor"
    label_map = np.full((75, 100), -1)
    for item in segmenter(image):
        label_map[np.array(item["mask"]) > 0] = model.config.label2id[item["label"]]
    protocol = SegmentationProtocol(scale=SCALE, crop_size=(64, 64), stride=(48, 48))
    whole = segment_image(model, processor, image, mode="whole", protocol=protocol).label_map.numpy()
    np.testing.assert_array_equal(label_map, whole)


def test_post_processing_refuses_sizes_that_do_not_fit(folder, image):
    model, processor = load(folder)
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    with pytest.raises(ValueError, match="target_sizes"):
        processor.post_process_semantic_segmentation(outputs)
    with pytest.raises(ValueError, match="do not come from an input padded to 64×128"):  # 75x200 -> 48x128
        processor.post_process_semantic_segmentation(outputs, target_sizes=[(75, 200)])
    with pytest.raises(ValueError, match="1 predictions but 2 target sizes"):
        processor.post_process_semantic_segmentation(outputs, target_sizes=[(75, 100), (75, 100)])


def test_slide_mode_treats_each_window_as_an_image(folder, image):
    model, processor = load(folder)
    protocol = SegmentationProtocol(scale=SCALE, crop_size=(48, 48), stride=(40, 40))  # 48 is not a multiple of 32
    pixel_values = processor(images=image, return_tensors="pt", do_pad=False)["pixel_values"]
    height, width = pixel_values.shape[-2:]
    total, count = torch.zeros(1, NUM_LABELS, height, width), torch.zeros(1, 1, height, width)
    for top in (0, 32):
        for left in (0, 40, 59):
            window = pixel_values[..., top : top + 48, left : left + 48]
            total[..., top : top + 48, left : left + 48] += reference_scores(model, window)
            count[..., top : top + 48, left : left + 48] += 1
    assert count.min() >= 1
    expected = F.interpolate(total / count, size=(75, 100), mode="bilinear", align_corners=False)[0]
    result = segment_image(model, processor, image, mode="slide", protocol=protocol, return_probabilities=True)
    agreement = (result.label_map == expected.argmax(0)).float().mean()
    assert agreement > 0.999, agreement  # banded resizes round differently: ties only
    torch.testing.assert_close(result.probabilities, expected.softmax(0), atol=1e-5, rtol=0)


def test_predict_cli_and_demo_on_a_mask2former_folder(folder, image, tmp_path):
    from offseg_hf.inference.demo import DemoApp, load_demo_models
    from offseg_hf.inference.predict import label_map_from_png

    photo = tmp_path / "photo.png"
    image.save(photo)
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-m", "offseg_hf", "predict", str(photo), "--model", str(folder), "--out",
         str(tmp_path / "out"), "--device", "cpu", "--scale", str(SCALE[0]), str(SCALE[1]), "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    predicted = label_map_from_png(tmp_path / "out" / "photo_labels.png")
    model, processor = load(folder)
    protocol = SegmentationProtocol(scale=SCALE, crop_size=(512, 512), stride=(480, 480))
    expected = segment_image(model, processor, image, mode="whole", protocol=protocol).label_map.numpy()
    np.testing.assert_array_equal(predicted, expected)
    summary = json.loads((tmp_path / "out" / "photo.json").read_text())
    assert {item["label"] for item in summary["classes"]} == {f"class{i}" for i in np.unique(expected)}

    app = DemoApp(load_demo_models([str(folder)], device="cpu", scale=SCALE))
    page = app.segment(str(photo), str(folder))
    assert not page.error, page.status
    np.testing.assert_array_equal(page.state["label_map"], expected)
