"""Ideal class representations (paper Sec. 3.2, Eq. 2, Fig. 3).

A per-pixel classifier predicts masks ``M = W·Eᵀ`` from pixel features E `(N, C)` (N pixels) and class
representations W `(K, C)` shared by every image. For one image, the representations that reproduce its
one-hot ground truth M `(K, N)` best in the least-squares sense are

    W* = M·(Eᵀ)⁺                                                               (Eq. 2)

(``⁺``: Moore–Penrose pseudo-inverse). If ``M_pred = W*·Eᵀ`` recovers the ground truth well (the paper finds
≈95% mIoU on ADE20K), the features *can* be classified linearly per image; if W* of the same class differs
strongly between images (low pairwise cosine similarity, Fig. 3), one fixed W cannot fit them all — the
misalignment offset learning addresses.

Pieces:

* :func:`pre_classifier_features`: E of OffSeg, SegFormer and SegFormer + offset learning (the input of their
  1×1 classifier / offset learning), via a hook, so the models run unchanged;
* :func:`labels_at_resolution`: ground truth at feature resolution (nearest neighbour);
* :func:`ideal_class_embeddings` (Eq. 2, float64) and :func:`reconstruct_labels` (argmax of ``W*·Eᵀ``);
* :class:`PrototypeMiner`: streams images, accumulates the reconstruction IoU and the W* rows of every class
  (up to ``images_per_class`` images each) → :class:`PrototypeAnalysis`;
* :class:`PrototypeAnalysis`: pairwise cosine similarities, heat maps (PNG), raw matrices (JSON / NPZ).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from offseg_hf.evaluation.metrics import StreamingIoU

from offseg_hf.data.files import IGNORE_INDEX  # noqa: E402

__all__ = [
    "PrototypeAnalysis",
    "PrototypeMiner",
    "classifier_module",
    "cosine_similarity_matrix",
    "ideal_class_embeddings",
    "labels_at_resolution",
    "learned_class_embeddings",
    "mine_ideal_prototypes",
    "plot_similarity_heatmaps",
    "pre_classifier_features",
    "reconstruct_labels",
]


# ---------------------------------------------------------------------------------------------- model side


def classifier_module(model: nn.Module) -> nn.Module:
    """The module that turns E into logits: SegFormer's 1×1 ``decode_head.classifier``, or the offset learning
    of OffSeg / SegFormer + offset learning.

    Raises:
        TypeError: for any other model (the supported classes are named).
    """
    from transformers import SegformerForSemanticSegmentation

    from offseg_hf.models.modeling_offseg import OffSegForSemanticSegmentation
    from offseg_hf.models.modeling_segformer_offset import SegformerOffsetForSemanticSegmentation

    if isinstance(model, OffSegForSemanticSegmentation):
        return model.offset_learning
    if isinstance(model, SegformerOffsetForSemanticSegmentation):
        return model.decode_head.offset_learning
    if isinstance(model, SegformerForSemanticSegmentation):
        return model.decode_head.classifier
    raise TypeError(
        "pre-classifier features are defined for OffSegForSemanticSegmentation, SegformerForSemanticSegmentation "
        f"and SegformerOffsetForSemanticSegmentation; got {type(model).__name__}"
    )


@torch.no_grad()
def pre_classifier_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """E: the input of the model's classifier (:func:`classifier_module`) for `pixel_values (B, 3, H, W)`.

    Returns `(B, C, h, w)`: `(B, 256, H/4, W/4)` for OffSeg, `(B, D, H/4, W/4)` for SegFormer, the max-pooled
    `(B, D, H/8, W/8)` for SegFormer + offset learning. Run the model in eval mode (dropout would otherwise
    be applied before the hook).
    """
    captured: dict[str, torch.Tensor] = {}

    def keep_input(module, args):
        captured["features"] = args[0]

    handle = classifier_module(model).register_forward_pre_hook(keep_input)
    try:
        model(pixel_values=pixel_values)
    finally:
        handle.remove()
    return captured["features"]


def learned_class_embeddings(model: nn.Module) -> torch.Tensor:
    """The fixed class representations W `(K, C)` the model learned: the 1×1 classifier weights, or the class
    embeddings offset learning starts from."""
    classifier = classifier_module(model)
    if isinstance(classifier, nn.Conv2d):
        return classifier.weight.detach().flatten(1)
    return classifier.class_embeddings.detach()


# ---------------------------------------------------------------------------------------------- Eq. 2


def labels_at_resolution(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of label maps `(B, H, W)` (or `(H, W)`) to ``size`` = (h, w); int64."""
    squeeze = labels.ndim == 2
    batch = labels[None] if squeeze else labels
    resized = F.interpolate(batch[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
    return resized[0] if squeeze else resized


def _as_pixels(features: torch.Tensor) -> torch.Tensor:
    """`(C, h, w)` → `(h·w, C)`; `(N, C)` unchanged."""
    if features.ndim == 3:
        return features.flatten(1).t()
    if features.ndim == 2:
        return features
    raise ValueError(f"features must be (C, h, w) or (N, C), got shape {tuple(features.shape)}")


def ideal_class_embeddings(
    features: torch.Tensor, labels: torch.Tensor, num_labels: int, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ideal class representations ``W* = M·(Eᵀ)⁺`` (Eq. 2), in float64.

    Args:
        features: E of one image, `(C, h, w)` or `(N, C)`.
        labels: its ground truth at the same resolution, `(h, w)` or `(N,)`; ``ignore_index`` pixels are left out
            of the fit.
        num_labels: K.

    Returns:
        ``W*`` `(K, C)` float64 (rows of classes absent from the image are 0, the minimum-norm solution) and
        ``present`` `(K,)` bool.
    """
    pixels = _as_pixels(features).to(torch.float64)
    flat = labels.reshape(-1).long()
    if flat.numel() != pixels.shape[0]:
        raise ValueError(
            f"labels have {flat.numel()} pixels but the features {pixels.shape[0]} (shape {tuple(features.shape)}); "
            "resize the labels with labels_at_resolution"
        )
    valid = flat != ignore_index
    pixels, flat = pixels[valid], flat[valid]
    if ((flat < 0) | (flat >= num_labels)).any():
        bad = int(flat[(flat < 0) | (flat >= num_labels)][0])
        raise ValueError(f"label value {bad} is outside [0, {num_labels}) and is not the ignore index {ignore_index}")
    targets = F.one_hot(flat, num_labels).to(torch.float64)  # Mᵀ: (N, K)
    weights = (torch.linalg.pinv(pixels) @ targets).t()  # ((Eᵀ)⁺)ᵀ·Mᵀ = (M·(Eᵀ)⁺)ᵀ → W*: (K, C)
    present = torch.zeros(num_labels, dtype=torch.bool, device=flat.device)
    present[flat.unique()] = True
    return weights, present


def reconstruct_labels(weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Argmax over classes of ``M_pred = W·Eᵀ``: `(K, C)`, `(C, h, w)` → `(h, w)` (or `(N, C)` → `(N,)`)."""
    pixels = _as_pixels(features).to(weights.dtype)
    predicted = (pixels @ weights.t()).argmax(dim=1)
    return predicted.reshape(features.shape[1:]) if features.ndim == 3 else predicted


def cosine_similarity_matrix(rows: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pairwise cosine similarity of the rows of `(n, C)` → `(n, n)` (float64; a zero row gives NaN)."""
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        unit = rows / norms
    return unit @ unit.T


# ---------------------------------------------------------------------------------------------- streaming


@dataclass
class PrototypeAnalysis:
    """Outcome of :class:`PrototypeMiner`.

    Attributes:
        num_images: images processed.
        reconstruction: metrics of ``argmax(W*·Eᵀ)`` against the ground truth at feature resolution
            (see :func:`offseg_hf.evaluation.metrics.metrics_from_confusion`; fractions in [0, 1]).
        prototypes: class id → `(n, C)` W* rows of that class from the first n images containing it.
        image_ids: class id → the ids of those n images.
        class_names: K names.
        learned: the model's fixed W `(K, C)`, when known.
        underdetermined_images: images with no more valid feature pixels N than channels C. There Eᵀ has full
            column rank N, W* reproduces *any* M exactly and its rows say nothing about the features; the
            analysis needs N ≫ C (the paper: 128² pixels at 1/4 of 512² for C = 256), i.e. large enough inputs.
    """

    num_images: int
    reconstruction: dict
    prototypes: dict[int, np.ndarray]
    image_ids: dict[int, list[int]]
    class_names: list[str]
    learned: np.ndarray | None = None
    underdetermined_images: int = 0

    def select_classes(self, classes: Sequence[int | str] | None = None, count: int = 6) -> list[int]:
        """Class ids from ids or names; by default the ``count`` classes seen in the most images (≥ 2)."""
        if classes:
            ids = []
            for item in classes:
                if isinstance(item, str) and not item.isdigit():
                    if item not in self.class_names:
                        raise ValueError(f"unknown class name {item!r}; known: {self.class_names}")
                    ids.append(self.class_names.index(item))
                else:
                    ids.append(int(item))
            missing = [i for i in ids if len(self.image_ids.get(i, [])) < 2]
            if missing:
                raise ValueError(
                    f"classes {[self.class_names[i] for i in missing]} appear in fewer than 2 of the "
                    f"{self.num_images} images processed; choose others or process more images"
                )
            return ids
        ranked = sorted(self.image_ids, key=lambda k: (-len(self.image_ids[k]), k))
        return [k for k in ranked if len(self.image_ids[k]) >= 2][:count]

    def similarity(self, class_id: int, include_learned: bool = False) -> np.ndarray:
        """Pairwise cosine similarity `(n, n)` of the W* rows of ``class_id`` (first row/column: the learned W
        of that class when ``include_learned``)."""
        rows = self.prototypes[class_id]
        if include_learned:
            if self.learned is None:
                raise ValueError("no learned class representations were given to the miner")
            rows = np.concatenate([self.learned[class_id][None], rows])
        return cosine_similarity_matrix(rows)

    def summary(self, classes: Sequence[int]) -> dict:
        """JSON-ready summary: reconstruction metrics and, per class, the matrix and its mean off-diagonal value."""
        per_class = {}
        for class_id in classes:
            matrix = self.similarity(class_id)
            off_diagonal = matrix[~np.eye(len(matrix), dtype=bool)]
            entry = {
                "class_id": int(class_id),
                "image_ids": [int(i) for i in self.image_ids[class_id]],
                "mean_pairwise_cosine": float(np.nanmean(off_diagonal)),
                "cosine_similarity": matrix.tolist(),
            }
            if self.learned is not None:
                entry["cosine_to_learned"] = self.similarity(class_id, include_learned=True)[0, 1:].tolist()
            per_class[self.class_names[class_id]] = entry
        return {
            "num_images": self.num_images,
            "underdetermined_images": self.underdetermined_images,
            "reconstruction_mIoU": self.reconstruction["mIoU"],
            "reconstruction_aAcc": self.reconstruction["aAcc"],
            "reconstruction": self.reconstruction,
            "classes": per_class,
        }

    def save(
        self,
        output_dir: str | Path,
        classes: Sequence[int | str] | None = None,
        count: int = 6,
        include_learned: bool = True,
        title: str | None = None,
    ) -> dict[str, Path]:
        """Write ``ideal_prototypes_heatmap.png``, ``ideal_prototypes.json`` and ``ideal_prototypes.npz``.

        The NPZ holds, per chosen class ``k``: ``similarity_{k}`` `(n, n)`, ``prototypes_{k}`` `(n, C)`,
        ``image_ids_{k}``; plus ``learned`` `(K, C)` when known.
        """
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        ids = self.select_classes(classes, count)
        if not ids:
            raise ValueError(f"no class appears in two or more of the {self.num_images} images processed")
        with_learned = include_learned and self.learned is not None
        panels = []
        for class_id in ids:
            n = len(self.image_ids[class_id])
            ticks = (["W"] if with_learned else []) + [str(i) for i in self.image_ids[class_id]]
            name = self.class_names[class_id]
            panels.append((f"{name} ({n} images)", self.similarity(class_id, with_learned), ticks))
        if title is None:
            title = f"Cosine similarity of per-image ideal class representations W* (Eq. 2), {self.num_images} images"
        paths = {"heatmap": plot_similarity_heatmaps(panels, output_dir / "ideal_prototypes_heatmap.png", title)}
        paths["json"] = output_dir / "ideal_prototypes.json"
        paths["json"].write_text(json.dumps(_json_safe(self.summary(ids)), indent=2))
        arrays = {}
        for class_id in ids:
            arrays[f"similarity_{class_id}"] = self.similarity(class_id)
            arrays[f"prototypes_{class_id}"] = self.prototypes[class_id]
            arrays[f"image_ids_{class_id}"] = np.asarray(self.image_ids[class_id])
        if self.learned is not None:
            arrays["learned"] = self.learned
        arrays["class_ids"] = np.asarray(ids)
        paths["npz"] = output_dir / "ideal_prototypes.npz"
        np.savez_compressed(paths["npz"], **arrays)
        return paths


def _json_safe(value):
    """NaN → None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


@dataclass
class PrototypeMiner:
    """Streams (features, labels) of images and accumulates Eq. 2 statistics.

    Args:
        num_labels: K.
        images_per_class: how many images' W* rows to keep per class (the first ones containing it).
        ignore_index: label value left out of the fit and of the metric.
        class_names: K names (default ``"class k"``).
        learned: the model's fixed W `(K, C)`, for the heat maps' reference row.
    """

    num_labels: int
    images_per_class: int = 10
    ignore_index: int = IGNORE_INDEX
    class_names: Sequence[str] | None = None
    learned: torch.Tensor | np.ndarray | None = None
    num_images: int = field(default=0, init=False)
    underdetermined_images: int = field(default=0, init=False)

    def __post_init__(self):
        if self.class_names is None:
            self.class_names = [f"class {k}" for k in range(self.num_labels)]
        if len(self.class_names) != self.num_labels:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_labels} classes")
        self._metric = StreamingIoU(self.num_labels, self.ignore_index, self.class_names)
        self._rows: dict[int, list[np.ndarray]] = {}
        self._ids: dict[int, list[int]] = {}

    def update(self, features: torch.Tensor, labels: torch.Tensor, image_ids: Sequence[int] | None = None) -> None:
        """Add a batch: E `(B, C, h, w)` and ground truth `(B, H, W)` at any resolution (resized to (h, w))."""
        if features.ndim != 4 or labels.ndim != 3 or features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected features (B, C, h, w) and labels (B, H, W), got {tuple(features.shape)} and {tuple(labels.shape)}"
            )
        labels = labels_at_resolution(labels.to(features.device), features.shape[-2:])
        if image_ids is None:
            image_ids = range(self.num_images, self.num_images + features.shape[0])
        for image_features, image_labels, image_id in zip(features, labels, image_ids):
            if int((image_labels != self.ignore_index).sum()) <= image_features.shape[0]:
                self.underdetermined_images += 1  # N ≤ C: W* interpolates any M exactly
            weights, present = ideal_class_embeddings(image_features, image_labels, self.num_labels, self.ignore_index)
            self._metric.update(reconstruct_labels(weights, image_features).cpu(), image_labels.cpu())
            for class_id in present.nonzero().flatten().tolist():
                rows = self._rows.setdefault(class_id, [])
                if len(rows) < self.images_per_class:
                    rows.append(weights[class_id].cpu().numpy())
                    self._ids.setdefault(class_id, []).append(int(image_id))
            self.num_images += 1

    def result(self) -> PrototypeAnalysis:
        learned = self.learned
        if isinstance(learned, torch.Tensor):
            learned = learned.detach().double().cpu().numpy()
        return PrototypeAnalysis(
            num_images=self.num_images,
            underdetermined_images=self.underdetermined_images,
            reconstruction=self._metric.compute(),
            prototypes={k: np.stack(rows) for k, rows in self._rows.items()},
            image_ids={k: list(ids) for k, ids in self._ids.items()},
            class_names=list(self.class_names),
            learned=learned,
        )


def mine_ideal_prototypes(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    images_per_class: int = 10,
    max_images: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> PrototypeAnalysis:
    """Run Eq. 2 over a dataset split for an OffSeg, SegFormer or SegFormer + offset learning model.

    Args:
        model: in eval mode; class names come from ``model.config.id2label``.
        batches: ``{"pixel_values": (B, 3, H, W), "labels": (B, H_l, W_l)}`` dicts (e.g. a DataLoader over
            :func:`offseg_hf.data.pipeline.attach_transform` rows with a test transform).
        images_per_class: W* rows kept per class for the heat maps.
        max_images: stop after this many images.
    """
    if model.training:
        raise ValueError(
            f"{type(model).__name__} is in training mode: call model.eval() first (dropout would alter E)"
        )
    num_labels = model.config.num_labels
    id2label = getattr(model.config, "id2label", None) or {}
    names = [str(id2label.get(k, id2label.get(str(k), f"class {k}"))) for k in range(num_labels)]
    miner = PrototypeMiner(num_labels, images_per_class, ignore_index, names, learned_class_embeddings(model))
    device = next(model.parameters()).device
    for batch in batches:
        if max_images is not None and miner.num_images >= max_images:
            break
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        if max_images is not None:
            keep = max_images - miner.num_images
            pixel_values, labels = pixel_values[:keep], labels[:keep]
        features = pre_classifier_features(model, pixel_values.to(device))
        miner.update(features, labels)
    return miner.result()


def plot_similarity_heatmaps(
    panels: Sequence[tuple[str, np.ndarray, Sequence[str]]],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Fig. 3-style grid of cosine-similarity heat maps with one shared colour bar, saved as PNG.

    Args:
        panels: ``(name, (n, n) matrix, n tick labels)`` per class.
        path: output ``.png``.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.2 * columns + 1.0, 4.0 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    image = None
    for axis, (name, matrix, ticks) in zip(axes.flat, panels):
        image = axis.imshow(matrix, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
        axis.set_title(name, fontsize=10)
        positions = np.arange(len(ticks))
        step = max(1, len(ticks) // 10)
        axis.set_xticks(positions[::step], [ticks[i] for i in positions[::step]], fontsize=7, rotation=90)
        axis.set_yticks(positions[::step], [ticks[i] for i in positions[::step]], fontsize=7)
        axis.set_xlabel("image", fontsize=8)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    if image is not None:
        figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.85, label="cosine similarity")
    if title:
        figure.suptitle(title, fontsize=11)
    path = Path(path)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path
