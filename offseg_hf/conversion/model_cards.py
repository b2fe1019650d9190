"""Model cards (Hub ``README.md``) of converted OffSeg models, rendered from ``templates/TEMPLATE.md`` (package data).

The templates are Jinja templates rendered by ``huggingface_hub.ModelCard.from_template``: the Hub metadata is a
``ModelCardData`` (with the paper's result as an ``EvalResult``), the text placeholders are filled from the tables
below, and a placeholder left without a value is an error. The paper's numbers are kept here, each labelled as reported by the paper;
where the paper's value is not recorded here the card says "see the paper" instead of a number.
"""

from __future__ import annotations

import os
from pathlib import Path

import jinja2
import jinja2.meta
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from offseg_hf.conversion.mask2former import swin_size
from offseg_hf.data.registry import get_dataset, get_dataset_info
from offseg_hf.models.configuration_offseg import OffSegConfig
from offseg_hf.models.modeling_offseg import OffSegForSemanticSegmentation

__all__ = [
    "CARD_DATASETS",
    "CARD_PRESETS",
    "PAPER_RESULTS",
    "card_name",
    "default_template_path",
    "render_backbone_card",
    "render_mask2former_card",
    "render_model_card",
    "write_model_cards",
]

CARD_PRESETS = ("offseg-t", "offseg-b", "offseg-l")
CARD_DATASETS = ("ade20k", "coco-stuff", "cityscapes")

# Reported by the paper (ICCV 2025, arXiv:2508.08811): single-scale val mIoU (%), parameters (M) and
# FLOPs (G, 512×512 input, convolution layers only). None = not recorded here: the card points to the paper.
PAPER_RESULTS: dict[tuple[str, str], dict[str, float | None]] = {
    ("offseg-t", "ade20k"): {"miou": 44.2, "params_m": 6.2, "gflops": 5.3},
    ("offseg-b", "ade20k"): {"miou": 45.9, "params_m": 13.0, "gflops": 10.3},
    ("offseg-l", "ade20k"): {"miou": 48.5, "params_m": 26.4, "gflops": 17.1},
}

_VARIANTS = {
    "offseg-t": ("OffSeg-T", "S1", "32, 32, 64, 128"),
    "offseg-b": ("OffSeg-B", "S2", "32, 64, 128, 256"),
    "offseg-l": ("OffSeg-L", "L", "32, 64, 128, 256"),
}

def _dataset_card(name: str) -> dict[str, str]:
    """The model-card facts of a dataset: its spec's card texts, its title, and the training crop and sliding
    window of its recipe and test protocol."""
    spec = get_dataset(name)
    crop, protocol = spec.recipe["crop_size"], spec.protocol
    return {
        **spec.card,
        "title": spec.title,
        "train_crop": f"{crop}×{crop}",
        "slide": f"{protocol.crop_size[0]}×{protocol.crop_size[1]} windows, stride {protocol.stride[0]}",
    }


_PAPER_URL = "https://arxiv.org/abs/2508.08811"


def card_name(preset: str, dataset: str) -> str:
    """Folder / repo / card file name, e.g. ``offseg-t-ade20k``, ``offseg-b-cocostuff``."""
    info = get_dataset_info(dataset)
    return f"{preset}-{get_dataset(info.name).card['slug']}"


def default_template_path() -> Path:
    """``templates/TEMPLATE.md`` next to this module, package data (``OFFSEG_MODEL_CARD_TEMPLATE`` overrides it)."""
    override = os.environ.get("OFFSEG_MODEL_CARD_TEMPLATE")
    if override:
        return Path(override)
    return Path(__file__).resolve().with_name("templates") / "TEMPLATE.md"


def _results_table(preset: str, dataset: str) -> str:
    rows = ["| Model | Dataset | mIoU (%) | Params (M) | FLOPs (G, 512×512) | Source |", "|---|---|---|---|---|---|"]
    title = get_dataset(dataset).title
    for other in CARD_PRESETS:
        reported = PAPER_RESULTS.get((other, dataset))
        name = _VARIANTS[other][0]
        marker = f"**{name}**" if other == preset else name
        if reported:
            rows.append(
                f"| {marker} | {title} | {reported['miou']:.1f} | {reported['params_m']:.1f} | {reported['gflops']:.1f} "
                f"| reported by the paper |"
            )
        else:
            rows.append(f"| {marker} | {title} | see the paper | see the paper | see the paper | [paper]({_PAPER_URL}) |")
    return "\n".join(rows)


def _card_data(preset: str, dataset: str, model_id: str) -> ModelCardData:
    spec = _dataset_card(dataset)
    reported = PAPER_RESULTS.get((preset, dataset))
    results = None
    if reported:
        results = [
            EvalResult(
                task_type="image-segmentation", task_name="Semantic Segmentation", dataset_type=spec["hub"],
                dataset_name=spec["title"], dataset_split="validation", metric_type="mean_iou",
                metric_value=reported["miou"], metric_name="mIoU (single scale, reported by the paper)",
                source_name="OffSeg paper (ICCV 2025)", source_url=_PAPER_URL,
            )
        ]
    return ModelCardData(
        license="other", license_name="offseg-non-commercial", license_link="https://github.com/HVision-NKU/OffSeg",
        library_name="transformers", pipeline_tag="image-segmentation",
        tags=["vision", "image-segmentation", "semantic-segmentation", "offseg", "efficientformerv2", spec["slug"]],
        datasets=[spec["hub"]], metrics=["mean_iou"], model_name=model_id if results else None, eval_results=results,
    )


def _count_parameters(preset: str, num_labels: int) -> int:
    """Exact parameter count of ``preset`` with ``num_labels`` classes (built on the meta device)."""
    with torch.device("meta"):
        model = OffSegForSemanticSegmentation(OffSegConfig.from_preset(preset, num_labels=num_labels))
    return sum(p.numel() for p in model.parameters())


def render_model_card(
    preset: str,
    dataset: str,
    *,
    model_id: str | None = None,
    num_parameters: int | None = None,
    source_checkpoint: str | None = None,
    template: str | os.PathLike | None = None,
) -> str:
    """The model card of ``preset`` (``offseg-t/b/l``) trained on ``dataset``.

    Args:
        preset: ``"offseg-t"``, ``"offseg-b"`` or ``"offseg-l"``.
        dataset: a dataset name or alias (see :func:`offseg_hf.data.registry.get_dataset_info`).
        model_id: name used in the usage snippets (Hub repo id or folder); default :func:`card_name`.
        num_parameters: parameter count to print; default: counted exactly on the meta device.
        source_checkpoint: file name of the converted checkpoint, recorded in a provenance note.
        template: template file; default :func:`default_template_path`.

    Raises:
        ValueError: unknown preset or dataset, or a placeholder of the template left unfilled.
        FileNotFoundError: ``template`` (or ``OFFSEG_MODEL_CARD_TEMPLATE``) names no file.
    """
    if preset not in _VARIANTS:
        raise ValueError(f"unknown OffSeg preset {preset!r}; choose one of {', '.join(_VARIANTS)}")
    info = get_dataset_info(dataset)
    spec = _dataset_card(info.name)
    path = Path(template) if template is not None else default_template_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"model card template {path} not found; pass template= or set OFFSEG_MODEL_CARD_TEMPLATE to an existing file"
        )
    model_id = model_id or card_name(preset, info.name)
    if num_parameters is None:
        num_parameters = _count_parameters(preset, info.num_labels)
    variant_name, backbone, channels = _VARIANTS[preset]
    provenance = ""
    if source_checkpoint:
        provenance = (
            f"\n## Conversion\n\nConverted from the authors' checkpoint `{source_checkpoint}` with "
            "`offseg convert` (offseg-hf); every tensor of the checkpoint was mapped or is on the converter's explicit "
            "drop list (the unused `decode_head.conv_seg` classifier, the unused 224-resolution attention tables, "
            "and constant buffers the model derives).\n"
        )
    values = {
        "title": f"{variant_name} — {spec['title']}",
        "variant_name": variant_name,
        "dataset_title": spec["title"],
        "dataset": info.name,
        "num_labels": str(info.num_labels),
        "backbone": backbone,
        "decoder_channels": channels,
        "parameters": f"{num_parameters:,} ({num_parameters / 1e6:.2f} M, counted from the model)",
        "train_split": spec["train_split"],
        "train_crop": spec["train_crop"],
        "results_table": _results_table(preset, info.name),
        "model_id": model_id,
        "resize_text": spec["resize"],
        "slide_text": spec["slide"],
        "evaluation_text": spec["evaluation"],
        "dataset_limitations": spec["limitations"],
        "provenance": provenance,
    }
    return _render(path, _card_data(preset, info.name, model_id), values)


def _render(path: Path, card_data: ModelCardData, values: dict[str, str]) -> str:
    """``ModelCard.from_template`` of ``path``, after checking that every placeholder has a value."""
    text = path.read_text(encoding="utf-8")
    placeholders = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(text))
    missing = sorted(placeholders - set(values) - {"card_data"})
    if missing:
        raise ValueError(f"template {path} uses placeholders with no value: {missing}")
    return str(ModelCard.from_template(card_data, template_str=text, **values)) + "\n"


_BACKBONE_PRESETS = {"s1": "offseg-t", "s2": "offseg-b", "l": "offseg-l"}  # S0 backs no OffSeg model


def render_backbone_card(
    variant: str,
    *,
    model_id: str,
    num_parameters: int,
    source_checkpoint: str | None = None,
    attention_biases: str = "zero",
    template: str | os.PathLike | None = None,
) -> str:
    """Card of a converted EfficientFormerV2 ImageNet backbone (``templates/BACKBONE_TEMPLATE.md``)."""
    path = Path(template) if template is not None else default_template_path().with_name("BACKBONE_TEMPLATE.md")
    if not path.is_file():
        raise FileNotFoundError(f"backbone card template {path} not found; pass template=")
    bias_text = {
        "zero": "zero (the OffSeg reference: its segmentation tables start at zero, the 224-resolution ImageNet "
        "tables are not used)",
        "transfer": "ImageNet tables carried over per relative offset (outer offsets repeat the outermost learned value)",
    }[attention_biases]
    preset = _BACKBONE_PRESETS.get(variant)
    training_snippet = ""
    if preset:
        training_snippet = (
            f"\n# start {_VARIANTS[preset][0]} training from it\n"
            "from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation\n"
            f'model = OffSegForSemanticSegmentation(OffSegConfig.from_preset("{preset}", num_labels=150))\n'
            "model.offseg.backbone.load_state_dict(backbone.state_dict())\n"
        )
    card_data = ModelCardData(
        license="other", license_name="efficientformer-v2-weights",
        license_link="https://github.com/snap-research/EfficientFormer", library_name="transformers",
        tags=["vision", "backbone", "efficientformerv2", "offseg"], datasets=["imagenet-1k"],
    )
    return _render(
        path,
        card_data,
        {
            "variant_upper": variant.upper(),
            "parameters": f"{num_parameters:,} ({num_parameters / 1e6:.2f} M)",
            "bias_text": bias_text,
            "source": f"`{source_checkpoint}`, converted with `offseg convert`" if source_checkpoint else "converted with `offseg convert`",
            "model_id": model_id,
            "training_snippet": training_snippet,
        },
    )


# Reported by the paper (Table 5, ADE20K val, single scale): mIoU (%) and parameters (M) of Mask2Former on Swin-T.
MASK2FORMER_PAPER_RESULTS: dict[tuple[str, bool], dict[str, float]] = {
    ("swin-t", False): {"miou": 47.7, "params_m": 47.4},
    ("swin-t", True): {"miou": 50.3, "params_m": 47.6},
}


def render_mask2former_card(
    config,
    dataset: str,
    *,
    model_id: str,
    num_parameters: int,
    source_checkpoint: str | None = None,
    template: str | os.PathLike | None = None,
) -> str:
    """Card of a converted Mask2Former (+ offset learning) model (``templates/MASK2FORMER_TEMPLATE.md``).

    Args:
        config: the model's `Mask2FormerConfig` / `Mask2FormerOffsetConfig` (Swin backbone).
        dataset: a dataset name or alias.
        model_id: name used in the usage snippet (Hub repo id or folder).
        num_parameters: parameter count to print.
        source_checkpoint: file name of the converted checkpoint, recorded in a provenance note.
        template: template file; default ``templates/MASK2FORMER_TEMPLATE.md``.
    """
    path = Path(template) if template is not None else default_template_path().with_name("MASK2FORMER_TEMPLATE.md")
    if not path.is_file():
        raise FileNotFoundError(f"Mask2Former card template {path} not found; pass template=")
    info = get_dataset_info(dataset)
    spec = _dataset_card(info.name)
    offset = config.model_type == "mask2former_offset"
    size = swin_size(config)
    swin = config.backbone_config
    unused_norm = 2 * swin.embed_dim * 2 ** (len(swin.depths) - 1)
    swin_name = f"Swin-{size.split('-')[1].upper()}" if size else "Swin"
    model_name = f"Mask2Former ({swin_name})" + (" with offset learning" if offset else "")
    rows = ["| Model | Dataset | mIoU (%) | Params (M) | Source |", "|---|---|---|---|---|"]
    for with_offsets in (False, True):
        reported = MASK2FORMER_PAPER_RESULTS.get((size, with_offsets)) if info.name == "ade20k" else None
        name = f"Mask2Former ({swin_name})" + (" + offset learning" if with_offsets else "")
        name = f"**{name}**" if with_offsets == offset else name
        if reported:
            rows.append(f"| {name} | {spec['title']} | {reported['miou']:.1f} | {reported['params_m']:.1f} | reported by the paper (Table 5) |")
        else:
            rows.append(f"| {name} | {spec['title']} | see the paper | see the paper | [paper]({_PAPER_URL}) |")
    provenance = ""
    if source_checkpoint:
        provenance = (
            f"\n## Conversion\n\nConverted from the authors' checkpoint `{source_checkpoint}` with `offseg convert` "
            "(offseg-hf); every tensor of the checkpoint was mapped, or checked and dropped (Swin's relative position "
            "indices, which the model builds itself).\n"
        )
    variant_text = (
        "Mask2Former with offset learning before every mask prediction: the query mask embeddings and the pixel "
        "embeddings are aligned by a class offset and a feature offset before their product, at every decoder stage."
        if offset else "Mask2Former (masked-attention mask transformer), the baseline of the paper's Table 5."
    )
    card_data = ModelCardData(
        license="other", license_name="offseg-non-commercial", license_link="https://github.com/HVision-NKU/OffSeg",
        library_name="transformers", pipeline_tag="image-segmentation",
        tags=["vision", "image-segmentation", "semantic-segmentation", "mask2former", "swin", "offseg", spec["slug"]],
        datasets=[spec["hub"]], metrics=["mean_iou"],
    )
    return _render(path, card_data, {
        "title": f"{model_name} — {spec['title']}",
        "variant_text": variant_text,
        "model_name": model_name,
        "dataset_title": spec["title"],
        "num_labels": str(info.num_labels),
        "num_labels_plus_one": str(info.num_labels + 1),
        "architecture": "Mask2FormerOffsetForUniversalSegmentation" if offset else "Mask2FormerForUniversalSegmentation",
        "swin_dim": str(config.backbone_config.embed_dim),
        "swin_depths": str(list(config.backbone_config.depths)),
        "swin_window": str(config.backbone_config.window_size),
        "num_queries": str(config.num_queries),
        "decoder_layers": str(config.decoder_layers - 1),
        "hidden_dim": str(config.hidden_dim),
        "parameters": f"{num_parameters:,} ({num_parameters / 1e6:.2f} M, counted from the model; {unused_norm:,} of them "
        "in the final LayerNorm that transformers' `SwinBackbone` holds but never applies)",
        "results_table": "\n".join(rows),
        "model_id": model_id,
        "resize_text": spec["resize"],
        "dataset_limitations": spec["limitations"],
        "provenance": provenance,
    })


def write_model_cards(directory: str | os.PathLike | None = None) -> list[Path]:
    """(Re)write the cards of every preset × card dataset into ``directory`` (default: ``model_cards/`` of
    the source checkout)."""
    directory = Path(directory) if directory is not None else Path(__file__).resolve().parents[2] / "model_cards"
    written = []
    for preset in CARD_PRESETS:
        for dataset in CARD_DATASETS:
            path = directory / f"{card_name(preset, dataset)}.md"
            path.write_text(render_model_card(preset, dataset), encoding="utf-8")
            written.append(path)
    return written
