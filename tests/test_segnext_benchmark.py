"""SegNeXt MAC counts against the reference statistics (fvcore counts of the official networks at 512×512)."""

import json

import pytest
import torch

from benchmarks.models import build_model, count_macs

NAMES = ["segnext-t", "segnext-s", "segnext-b", "segnext-l", "segnext-t-offset", "segnext-s-offset", "segnext-b-offset"]


@pytest.mark.parametrize("name", NAMES)
def test_segnext_mac_counts_match_reference(fixtures_dir, name):
    stats = json.loads((fixtures_dir / "segnext_official_stats.json").read_text())[name]
    with torch.device("meta"):  # shapes are all the counter needs
        macs = count_macs(build_model(name), torch.empty(1, 3, 512, 512))
    by_operator = stats["fvcore_macs_by_operator"]
    assert macs.conv == stats["fvcore_macs_conv_only"]
    if not name.endswith("-offset"):
        assert macs.matmul == by_operator["bmm"] == stats["fvcore_macs_nmf"]  # the NMF iterations
        return
    # offset learning re-associated (OffsetLearning.masks): HW·(C² + K·C − K²) − (K·C² + K²·C) fewer MACs at 1/8
    pixels, classes = (512 // 8) ** 2, 150
    channels = 512 if name.startswith("segnext-b") else 256
    saved = pixels * (channels * channels + classes * channels - classes * classes)
    saved -= classes * channels * channels + classes * channels * classes
    assert macs.matmul == by_operator["bmm"] + by_operator["matmul"] + by_operator["linear"] - saved
