"""``offseg evaluate`` and ``offseg predict`` load any folder this package can make through one loader
(:func:`offseg_hf.inference.predict.load_model`, Transformers' Auto classes with the package's registrations): OffSeg,
SegFormer + offset learning (``segformer_offset``) and a plain Transformers SegFormer."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from offseg_hf import OffSegForSemanticSegmentation
from offseg_hf.cli import main
from offseg_hf.inference.image_processing_offseg import build_image_processor
from offseg_hf.plug import add_offset_learning

pytestmark = pytest.mark.torch_threads(1)

NUM_LABELS = 4


def _segformer() -> SegformerForSemanticSegmentation:
    config = SegformerConfig(num_labels=NUM_LABELS, hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 2, 2],
                             depths=[1, 1, 1, 1], decoder_hidden_size=16,
                             id2label={i: f"class{i}" for i in range(NUM_LABELS)},
                             label2id={f"class{i}": i for i in range(NUM_LABELS)})
    return SegformerForSemanticSegmentation(config)


def _offseg():
    from test_training import tiny_config

    return OffSegForSemanticSegmentation(tiny_config(NUM_LABELS))


BUILDERS = {
    "segformer": _segformer,
    "segformer_offset": lambda: add_offset_learning(_segformer()),
    "offseg": _offseg,
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model_folder(request, tmp_path_factory):
    torch.manual_seed(0)
    model = BUILDERS[request.param]()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    build_image_processor("synthetic", scale=(32, 32)).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == request.param
    return request.param, folder


def test_evaluate_accepts_the_folder(model_folder, tmp_path, capsys):
    kind, folder = model_folder
    status = main(["evaluate", "--model", str(folder), "--dataset", "synthetic", "--eval-samples", "2",
                   "--image-size", "32", "--output-dir", str(tmp_path), "--device", "cpu", "--quiet"])
    assert status == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "eval_synthetic_validation_whole.json").read_text())
    assert report["metrics"]["num_images"] == 2 and 0.0 <= report["metrics"]["mIoU"] <= 1.0


def test_predict_accepts_the_folder(model_folder, tmp_path, capsys):
    kind, folder = model_folder
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
    status = main(["predict", str(image), "--model", str(folder), "--out", str(tmp_path / "out"), "--device", "cpu",
                   "--scale", "64", "32", "--quiet"])
    assert status == 0, capsys.readouterr().err
    labels = np.asarray(Image.open(tmp_path / "out" / "scene_labels.png"))
    assert labels.shape == (40, 48) and labels.max() < NUM_LABELS


def test_benchmark_and_prototypes_load_the_folder_with_the_same_loader(model_folder):
    from benchmarks.models import build_model
    from research.mine_prototypes import load_model as prototypes_model
    from offseg_hf.inference.predict import load_model

    kind, folder = model_folder
    reference, _ = load_model(str(folder), device="cpu", fold_batch_norm=False)
    for model in (build_model(str(folder)), prototypes_model(str(folder), NUM_LABELS)):
        assert type(model) is type(reference) and model.config.model_type == kind
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
