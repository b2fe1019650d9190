"""MAC counting against the reference statistics (fvcore counts of the reference network)."""

import json

import pytest
import torch

from benchmarks.models import build_model, count_macs, count_parameters, format_table, run_benchmark


@pytest.mark.parametrize("preset", ["offseg-t", "offseg-b", "offseg-l"])
def test_mac_counts_match_reference(fixtures_dir, preset):
    stats = json.loads((fixtures_dir / "offseg_official_stats.json").read_text())[preset]
    macs = count_macs(build_model(preset), torch.randn(1, 3, 512, 512))
    by_operator = stats["fvcore_macs_by_operator"]
    assert macs.conv == stats["fvcore_macs_conv_only"]
    assert macs.carafe == stats["carafe_macs"]
    # Our offset learning re-associates Eq. 13 (see OffsetLearning.masks): the reference's
    # HW·C·C feature-offset projection and HW·K·C class mixing become an HW·K·K product (+ tiny K-sized terms).
    pixels, channels, classes = (512 // 4) ** 2, 256, 150
    saved = pixels * (channels * channels + classes * channels - classes * classes)
    saved -= classes * channels * channels + classes * channels * classes
    assert macs.matmul == by_operator["matmul"] + by_operator["linear"] - saved
    # The paper's "FLOPs" are the convolution MACs (within 0.5 %).
    assert abs(macs.conv / 1e9 - stats["paper_flops_G"]) / stats["paper_flops_G"] < 0.01


def test_benchmark_table_has_ratios_against_segformer():
    rows = run_benchmark(["segformer-b0", "offseg-t"], size=64, runs=1, warmup=0, threads=None, num_labels=5)
    assert [row.name for row in rows] == ["segformer-b0", "offseg-t"]
    assert rows[1].parameters == count_parameters(build_model("offseg-t", 5))
    table = format_table(rows)
    lines = table.splitlines()
    assert "latency / segformer-b0" in lines[0]
    assert lines[2].endswith("| 1.00 |")  # the baseline against itself
    assert len(lines) == 4


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'segformer-b9'"):
        build_model("segformer-b9")
