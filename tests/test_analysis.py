"""Ideal class representations (Eq. 2): exact recovery on a constructed linear problem, features, heat maps."""

import json

import numpy as np
import pytest
import torch
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from research.prototypes import (
    PrototypeMiner,
    cosine_similarity_matrix,
    ideal_class_embeddings,
    labels_at_resolution,
    learned_class_embeddings,
    mine_ideal_prototypes,
    pre_classifier_features,
    reconstruct_labels,
)
from offseg_hf.plug import add_offset_learning


def linear_problem(num_labels=4, channels=10, height=6, width=7, seed=0):
    """Features E `(C, h, w)` and labels with ``W_true·Eᵀ`` exactly one-hot, E of full column rank."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(num_labels, channels, generator=generator, dtype=torch.float64)  # W_true (K, C)
    labels = torch.randint(0, num_labels, (height * width,), generator=generator)
    labels[:num_labels] = torch.arange(num_labels)  # every class present
    row_space = torch.linalg.pinv(weights)  # (C, K): W·pinv(W) = I_K
    null_space = torch.eye(channels, dtype=torch.float64) - row_space @ weights  # projector onto ker(W)
    noise = torch.randn(height * width, channels, generator=generator, dtype=torch.float64) @ null_space
    pixels = torch.nn.functional.one_hot(labels, num_labels).double() @ row_space.t() + noise  # (N, C)
    assert torch.linalg.matrix_rank(pixels) == channels
    return weights, pixels.t().reshape(channels, height, width), labels.reshape(height, width)


def test_recovers_a_known_linear_classifier_exactly():
    true_weights, features, labels = linear_problem()
    weights, present = ideal_class_embeddings(features, labels, num_labels=4)
    assert weights.dtype == torch.float64 and present.all()
    torch.testing.assert_close(weights, true_weights, atol=1e-10, rtol=1e-10)
    assert torch.equal(reconstruct_labels(weights, features), labels)


def test_ignored_pixels_and_absent_classes():
    true_weights, features, labels = linear_problem(num_labels=4, channels=6, height=8, width=8)
    labels = labels.clone()
    labels[labels == 3] = 255  # class 3 never seen: its row is the minimum-norm 0
    labels[0, 0] = 255
    weights, present = ideal_class_embeddings(features.float(), labels, num_labels=4)
    assert present.tolist() == [True, True, True, False]
    torch.testing.assert_close(weights[3], torch.zeros(6, dtype=torch.float64))
    valid = labels != 255
    assert torch.equal(reconstruct_labels(weights, features)[valid], labels[valid])
    with pytest.raises(ValueError, match="labels_at_resolution"):
        ideal_class_embeddings(features, labels[:4], num_labels=4)
    with pytest.raises(ValueError, match="value 7"):
        ideal_class_embeddings(features, torch.full_like(labels, 7), num_labels=4)


def test_cosine_similarity_and_label_resize():
    rows = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    np.testing.assert_allclose(cosine_similarity_matrix(rows), [[1, 0, -1], [0, 1, 0], [-1, 0, 1]])
    labels = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    assert labels_at_resolution(labels, (2, 2)).tolist() == [[0, 1], [2, 3]]


def test_miner_on_linear_images_reports_perfect_reconstruction_and_writes_heatmaps(tmp_path):
    weights_a, features_a, labels_a = linear_problem(seed=1)
    weights_b, features_b, labels_b = linear_problem(seed=2)
    weights_c, features_c, labels_c = linear_problem(seed=3)
    miner = PrototypeMiner(num_labels=4, images_per_class=5, class_names=["sky", "road", "tree", "car"],
                           learned=weights_a)
    miner.update(torch.stack([features_a, features_b]), torch.stack([labels_a, labels_b]))
    miner.update(features_c[None], labels_c[None])
    result = miner.result()
    assert result.num_images == 3 and result.underdetermined_images == 0  # 42 pixels > 10 channels
    assert result.reconstruction["mIoU"] == pytest.approx(1.0)
    np.testing.assert_allclose(result.prototypes[0], np.stack([weights_a[0], weights_b[0], weights_c[0]]), atol=1e-9)
    similarity = result.similarity(0)
    expected = cosine_similarity_matrix(np.stack([weights_a[0], weights_b[0], weights_c[0]]))
    np.testing.assert_allclose(similarity, expected)
    assert result.similarity(0, include_learned=True)[0, 1] == pytest.approx(1.0)  # image 0 is the learned W

    paths = result.save(tmp_path, classes=["sky", "car"])
    summary = json.loads(paths["json"].read_text())
    assert summary["reconstruction_mIoU"] == pytest.approx(1.0)
    assert set(summary["classes"]) == {"sky", "car"}
    np.testing.assert_allclose(summary["classes"]["sky"]["cosine_similarity"], similarity)
    with np.load(paths["npz"]) as arrays:
        np.testing.assert_allclose(arrays["similarity_0"], similarity)
        assert arrays["prototypes_3"].shape == (3, 10)

    from matplotlib.image import imread

    pixels = imread(paths["heatmap"])
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert pixels[..., :3].std() > 0.05  # a real picture, not a blank canvas
    assert len(np.unique(pixels[..., :3].reshape(-1, 3), axis=0)) > 50  # colour map + colour bar + text
    with pytest.raises(ValueError, match="unknown class name"):
        result.save(tmp_path, classes=["boat"])


def test_pre_classifier_features_of_segformer_and_its_offset_variant():
    config = SegformerConfig(
        num_labels=5, hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 2, 2], depths=[1, 1, 1, 1],
        decoder_hidden_size=16,
    )
    segformer = SegformerForSemanticSegmentation(config).eval()
    plugged = add_offset_learning(segformer).eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    plain = pre_classifier_features(segformer, pixel_values)
    pooled = pre_classifier_features(plugged, pixel_values)
    assert plain.shape == (2, 16, 16, 16) and pooled.shape == (2, 16, 8, 8)
    torch.testing.assert_close(pooled, torch.nn.functional.max_pool2d(plain, 2))
    # the 1×1 classifier is exactly linear in E: logits = W·E + b
    with torch.no_grad():
        logits = segformer(pixel_values).logits
    weight = learned_class_embeddings(segformer)
    expected = torch.einsum("kc,bchw->bkhw", weight, plain) + segformer.decode_head.classifier.bias[:, None, None]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert learned_class_embeddings(plugged).shape == (5, 16)

    batches = [{"pixel_values": pixel_values, "labels": torch.randint(0, 5, (2, 64, 64))}] * 2
    result = mine_ideal_prototypes(plugged, batches, images_per_class=3, max_images=3)
    assert result.num_images == 3 and 0.0 <= result.reconstruction["mIoU"] <= 1.0
    assert result.underdetermined_images == 0  # 8×8 = 64 feature pixels > 16 channels
    assert result.class_names == [config.id2label[k] for k in range(5)]
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        mine_ideal_prototypes(plugged.train(), batches)
    with pytest.raises(TypeError, match="OffSegForSemanticSegmentation"):
        pre_classifier_features(torch.nn.Linear(2, 2), pixel_values)


def test_prototypes_command_smoke(tmp_path, capsys):
    """python -m research.mine_prototypes end to end on a random SegFormer + offset learning and tiny scenes."""
    import argparse

    from research import mine_prototypes as prototypes

    parser = argparse.ArgumentParser()
    prototypes.add_arguments(parser)
    args = parser.parse_args([
        "--model", "segformer-b0-offset", "--num-labels", "4", "--num-samples", "6", "--image-size", "64",
        "--max-images", "6", "--images-per-class", "4", "--num-shown", "2", "--output-dir", str(tmp_path),
    ])
    assert prototypes.run(args) == 0
    out = capsys.readouterr().out
    assert "reconstruction mIoU" in out and "mean pairwise cosine" in out
    assert "warning: 6 images" in out  # 8×8 feature pixels ≤ 256 channels: W* interpolates
    summary = json.loads((tmp_path / "ideal_prototypes.json").read_text())
    assert summary["num_images"] == 6 and len(summary["classes"]) == 2
    assert (tmp_path / "ideal_prototypes_heatmap.png").stat().st_size > 10_000
