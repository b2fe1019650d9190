"""Model cards: rendering from offseg_hf/conversion/templates/TEMPLATE.md, Hub metadata, paper numbers labelled as such."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from offseg_hf.conversion import model_cards
from offseg_hf.conversion.model_cards import (
    CARD_DATASETS,
    CARD_PRESETS,
    PAPER_RESULTS,
    card_name,
    default_template_path,
    render_model_card,
)

CARDS_DIR = Path(__file__).resolve().parent.parent / "model_cards"
ALL = [(preset, dataset) for preset in CARD_PRESETS for dataset in CARD_DATASETS]
# exact parameter counts of the built models (150 classes: golden stats, excluding the unused conv_seg)
PARAMETERS = {("offseg-t", "ade20k"): 6_183_626, ("offseg-b", "ade20k"): 12_916_850, ("offseg-l", "ade20k"): 26_375_458}


@pytest.fixture(scope="module")
def cards():
    return {(p, d): render_model_card(p, d) for p, d in ALL}


def test_committed_cards_are_rendered_from_the_template(cards):
    """model_cards/<name>.md is exactly what the renderer produces (re-run offseg_hf.conversion.model_cards.write_model_cards)."""
    assert default_template_path() == Path(model_cards.__file__).with_name("templates") / "TEMPLATE.md"
    for (preset, dataset), text in cards.items():
        path = CARDS_DIR / f"{card_name(preset, dataset)}.md"
        assert path.is_file(), path
        assert path.read_text(encoding="utf-8") == text, f"{path.name} is stale"
    assert {p.name for p in CARDS_DIR.glob("offseg-*.md")} == {f"{card_name(p, d)}.md" for p, d in ALL}


@pytest.mark.parametrize("preset, dataset", ALL)
def test_hub_metadata(cards, preset, dataset):
    card = ModelCard(cards[preset, dataset])
    data = card.data
    assert data.license == "other" and data.license_name and data.license_link
    assert data.library_name == "transformers" and data.pipeline_tag == "image-segmentation"
    assert data.metrics == ["mean_iou"] and len(data.datasets) == 1 and "semantic-segmentation" in data.tags
    reported = PAPER_RESULTS.get((preset, dataset))
    if reported:
        (result,) = data.eval_results
        assert result.metric_value == reported["miou"] and result.source_url == "https://arxiv.org/abs/2508.08811"
        assert "reported by the paper" in result.metric_name
    else:
        assert not data.eval_results
    assert "{{" not in card.text and "}}" not in card.text


def test_paper_numbers_are_the_reported_ones_and_labelled(cards):
    assert PAPER_RESULTS == {
        ("offseg-t", "ade20k"): {"miou": 44.2, "params_m": 6.2, "gflops": 5.3},
        ("offseg-b", "ade20k"): {"miou": 45.9, "params_m": 13.0, "gflops": 10.3},
        ("offseg-l", "ade20k"): {"miou": 48.5, "params_m": 26.4, "gflops": 17.1},
    }
    ade = cards["offseg-b", "ade20k"]
    assert "| **OffSeg-B** | ADE20K | 45.9 | 13.0 | 10.3 | reported by the paper |" in ade
    assert "| OffSeg-T | ADE20K | 44.2 | 6.2 | 5.3 | reported by the paper |" in ade
    for (preset, dataset), text in cards.items():
        assert "Results reported by the paper" in text
        rows = [line for line in text.splitlines() if line.startswith("| ") and "OffSeg-" in line and "|---" not in line]
        assert len(rows) == 3
        for row in rows:
            if dataset == "ade20k":
                assert row.endswith("| reported by the paper |")
            else:  # no number we could verify: the card must not invent one
                assert "see the paper" in row and not re.search(r"\| \d+\.\d \|", row)


def test_parameter_counts_and_usage(cards):
    for (preset, dataset), count in PARAMETERS.items():
        assert f"| Parameters | {count:,} (" in cards[preset, dataset]
    # class-dependent head: K × 256 class embeddings + 2K LayerNorm parameters
    assert f"| Parameters | {6_183_626 + (19 - 150) * 258:,} (" in cards["offseg-t", "cityscapes"]
    text = cards["offseg-l", "coco-stuff"]
    assert 'from_pretrained("offseg-l-cocostuff")' in text and 'pipeline("image-segmentation", model="offseg-l-cocostuff", trust_remote_code=False)' in text
    assert 'protocol="coco-stuff"' in text and "171 classes" in text


def test_render_options_and_errors(tmp_path):
    text = render_model_card("offseg-t", "cityscapes", model_id="me/offseg-t-cityscapes", num_parameters=123, source_checkpoint="ck.pth")
    assert 'from_pretrained("me/offseg-t-cityscapes")' in text and "| Parameters | 123 (" in text
    assert "## Conversion" in text and "`ck.pth`" in text
    assert card_name("offseg-b", "coco_stuff") == "offseg-b-cocostuff"
    with pytest.raises(ValueError, match="unknown OffSeg preset 'offseg-xl'"):
        render_model_card("offseg-xl", "ade20k")
    with pytest.raises(ValueError, match="unknown dataset 'voc'"):
        render_model_card("offseg-t", "voc")
    template = tmp_path / "t.md"
    template.write_text("---\nlicense: other\n---\n{{title}} {{nonsense}}\n")
    with pytest.raises(ValueError, match=r"placeholders with no value: \['nonsense'\]"):
        render_model_card("offseg-t", "ade20k", template=template, num_parameters=1)
    with pytest.raises(FileNotFoundError, match="OFFSEG_MODEL_CARD_TEMPLATE"):
        render_model_card("offseg-t", "ade20k", template=tmp_path / "missing.md", num_parameters=1)


def test_backbone_card():
    from offseg_hf.conversion.model_cards import render_backbone_card

    text = render_backbone_card("s2", model_id="me/eformer-s2", num_parameters=12_151_408, source_checkpoint="eformer_s2_450.pth")
    card = ModelCard(text)
    assert card.data.library_name == "transformers" and card.data.datasets == ["imagenet-1k"]
    assert "EfficientFormerV2-S2" in text and "12,151,408 (12.15 M)" in text and "`eformer_s2_450.pth`" in text
    assert 'EfficientFormerV2Backbone.from_pretrained("me/eformer-s2")' in text
    assert 'OffSegConfig.from_preset("offseg-b", num_labels=150)' in text and "zero (the OffSeg reference" in text
    s0 = render_backbone_card("s0", model_id="x", num_parameters=1, attention_biases="transfer")
    assert "OffSegConfig" not in s0 and "carried over per relative offset" in s0 and "{{" not in s0
