"""MAC counting against the reference statistics (fvcore counts of the reference network)."""

import itertools
import json
import re

import pytest
import torch

from benchmarks.models import (
    Timer,
    build_model,
    count_macs,
    count_operators,
    count_parameters,
    format_device_table,
    format_table,
    interleaved_times,
    median_ratio,
    peak_memory_mib,
    prepare_for_inference,
    product_seconds,
    run_benchmark,
    run_device_benchmark,
)


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
    rows = run_benchmark(
        ["offseg-t"], size=64, runs=2, warmup=0, threads=None, num_labels=5, train_runs=1, products=True
    )
    assert [row.name for row in rows] == ["segformer-b0", "offseg-t"]  # the baseline is added
    assert rows[1].parameters == count_parameters(build_model("offseg-t", 5))
    assert rows[0].latency_ratio == rows[0].train_ratio == 1.0
    assert rows[1].latency_ratio == median_ratio(rows[1].latencies, rows[0].latencies)
    assert len(rows[1].train_times) == 1 and rows[1].images_per_second == 2 / rows[1].train_times[0]
    lines = format_table(rows).splitlines()
    assert "inference / segformer-b0" in lines[0] and "train / segformer-b0" in lines[0]
    assert len(lines) == 4 and lines[2].split("|")[7].strip() == "1.00"  # the baseline against itself
    assert "products / segformer-b0 latency" in lines[0] and all(row.product_time > 0 for row in rows)


def test_product_time_counts_convolutions_and_matrix_products_only():
    matrix, image = torch.randn(256, 256), torch.randn(1, 16, 64, 64)
    weight = torch.randn(16, 16, 3, 3)
    assert product_seconds(lambda: matrix.exp().sum()) == 0
    assert product_seconds(lambda: matrix @ matrix) > 0
    assert product_seconds(lambda: torch.nn.functional.conv2d(image, weight)) > 0
    # inductor calls the library products as external kernels, which the profiler still names
    compiled = torch.compile(lambda: (matrix @ matrix).relu())
    assert product_seconds(compiled) > 0


def test_peak_memory_of_a_training_step_is_measured_in_a_fresh_process():
    small = peak_memory_mib("offseg-t", "training", size=64, num_labels=5, threads=1)
    large = peak_memory_mib("offseg-t", "training", size=256, num_labels=5, threads=1)
    # Gradients and AdamW state alone are 3 × 6.1 M floats (70 MiB); activations of a 16x larger input add more.
    assert 60 < small < large


def test_operator_count_of_offseg_t_is_within_budget():
    """Issue 14: at most 1,000 operators per inference forward (the count does not depend on the input size)."""
    model = prepare_for_inference(build_model("offseg-t", 150))

    def count_after_a_first_call(pixel_values):  # the first call at a size also resizes the attention biases
        with torch.no_grad():
            model(pixel_values)
        return count_operators(model, pixel_values)

    small = count_after_a_first_call(torch.randn(1, 3, 64, 64))
    assert small <= 1000
    assert small == count_after_a_first_call(torch.randn(1, 3, 96, 128))


def test_device_benchmark_runs_its_device_independent_path_on_the_cpu():
    rows = run_device_benchmark(
        ["offseg-t"], device="cpu", size=64, batches=(1, 2), precisions=("fp32", "bf16"),
        modes=("eager", "cudagraphs"), runs=1, warmup=0, num_labels=5,
    )
    # cudagraphs needs CUDA and is skipped; every model × precision × batch otherwise.
    assert [(r.name, r.precision, r.batch, r.mode) for r in rows][:4] == [
        ("segformer-b0", "fp32", 1, "eager"), ("offseg-t", "fp32", 1, "eager"),
        ("segformer-b0", "fp32", 2, "eager"), ("offseg-t", "fp32", 2, "eager"),
    ]
    assert len(rows) == 8 and all(r.ratio == 1.0 for r in rows if r.name == "segformer-b0")
    assert format_device_table(rows).count("\n") == 9


def test_cuda_benchmark_refuses_cleanly_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal path does not apply")
    from benchmarks import compare_models
    from offseg_hf.cli import run_tool

    assert run_tool(compare_models, ["--device", "cuda", "--models", "offseg-t"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="no CUDA device"):
        run_device_benchmark(["offseg-t"], device="cuda")


def test_timer_and_interleaving():
    calls = {"a": lambda: None, "b": lambda: sum(range(1000))}
    times = interleaved_times(calls, runs=3, warmup=1, timer=Timer("cpu"))
    assert set(times) == {"a", "b"} and all(len(v) == 3 and min(v) >= 0 for v in times.values())
    assert median_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'segformer-b9'"):
        build_model("segformer-b9")


# ----------------------------------------------------------------------------------------- benchmarks.deploy
@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Folders of two tiny transformers SegFormers (5 classes, different widths) as the deploy table's model and
    baseline: the table does not depend on the model type, and their ONNX exports take seconds where an OffSeg's
    (tiny or not) takes over a minute."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    root = tmp_path_factory.mktemp("deploy-models")
    for name, hidden in (("tiny-a", [8, 16, 16, 32]), ("tiny-b", [8, 8, 16, 16])):
        torch.manual_seed(0)
        SegformerForSemanticSegmentation(SegformerConfig(
            hidden_sizes=hidden, depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=16,
            num_labels=5,
        )).save_pretrained(root / name)
    return str(root / "tiny-a"), str(root / "tiny-b")


_NOISE = re.compile(r"warn|\[torch\.onnx\]|^[WE]\d{4} |onnxruntime", re.IGNORECASE | re.MULTILINE)


def test_deploy_table_has_every_requested_row_and_column_and_is_quiet(tiny_pair, tmp_path, capfd):
    from benchmarks import deploy
    from offseg_hf.cli import run_tool

    paths = ["bf16-autocast", "bf16-weights", "fp16-autocast", "int8-pt2e", "ort-fp32", "ort-int8", "compiled-fp32"]
    model, baseline = tiny_pair
    assert run_tool(deploy, [
        "--model", model, "--baseline", baseline, "--size", "64", "--runs", "1", "--warmup", "0", "--scenes", "1",
        "--floor-runs", "1", "--work-dir", str(tmp_path), "--paths", *paths, "--train", "--train-size", "64",
    ]) == 0
    out, err = capfd.readouterr()
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("| path |"))
    for name in tiny_pair:
        for column in (f"{name} ms", "× own fp32", "floor ms", "÷ floor", "drift (agreement)"):
            assert column in header
    assert header.count("floor ms") == 2 and f"{model} ÷ {baseline}" in header
    table = itertools.takewhile(lambda line: line.startswith("| "), lines[lines.index(header) + 2:])
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table}
    assert list(rows) == [deploy.PATHS[key][0] for key in ["eager", *paths]]
    assert all(len(cells) == header.count("|") - 2 and "failed" not in "".join(cells) for cells in rows.values())
    assert all(float(cells[3]) > 0 and float(cells[8]) > 0 for cells in rows.values())  # both conv+matmul floors
    assert [cells[2].strip() for cells in rows.values()][0] == "1.00"  # eager against itself
    cpu = next(line for line in lines if line.startswith("CPU: "))
    assert "load average" in cpu and "avx512_bf16" in cpu
    assert "ONNX Runtime fp32: " in out and "in all nodes" in out  # the ORT node-time floor of both models
    assert "compiled fp32 (inductor): " in out
    training = lines[next(i for i, line in enumerate(lines) if line.startswith("| precision |")) + 2:][:2]
    assert [line.split("|")[1].strip() for line in training] == ["fp32", "bf16 autocast"]
    # Quiet: the exporter, quantisers, inductor and ONNX Runtime did print (hidden, counted), and none of it shows.
    hidden = re.search(r"quiet: (\d+) lines the libraries printed", out)
    assert hidden and int(hidden.group(1)) > 0
    assert not _NOISE.search(out + err), _NOISE.search(out + err).group(0)


def test_deploy_trained_model_rows_carry_mIoU_and_agreement_on_its_validation_set(tiny_pair, tmp_path, capfd):
    from benchmarks import deploy
    from offseg_hf.cli import run_tool

    model, baseline = tiny_pair
    assert run_tool(deploy, [
        "--model", model, "--baseline", baseline, "--size", "64", "--runs", "1", "--warmup", "0", "--scenes", "1",
        "--floor-runs", "1", "--work-dir", str(tmp_path), "--paths", "bf16-autocast", "--no-compile",
        "--trained", model, "--eval-samples", "3",
    ]) == 0
    out, err = capfd.readouterr()
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("| path |"))
    assert "drift (agreement, mIoU Δ, trained agreement)" in header
    table = itertools.takewhile(lambda line: line.startswith("| "), lines[lines.index(header) + 2:])
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table}
    eager, bf16 = rows["eager fp32"][5], rows["bf16 autocast"][5]
    assert "mIoU +0.0" in eager and "trained" not in eager  # the reference of both
    agreement = re.search(r"mIoU [+-]\d+\.\d, trained (\d+\.\d\d) %", bf16)
    assert agreement and 50.0 <= float(agreement.group(1)) <= 100.0, bf16
    assert "trained" not in rows["bf16 autocast"][10]  # the baseline has no trained folder here
    assert "Loading weights" not in out + err and not _NOISE.search(out + err)


def test_cpu_facts_and_precision_support():
    from benchmarks.deploy import precision_support
    from benchmarks.models import CPU_UNIT_FLAGS, cpu_facts

    facts = cpu_facts()
    assert tuple(facts.flags) == CPU_UNIT_FLAGS and facts.model and facts.logical_cpus >= 1
    assert facts.bf16_units == (facts.flags["avx512_bf16"] or facts.flags["amx_bf16"])
    assert facts.model in facts.line() and "load average" in facts.line()
    assert precision_support(torch.bfloat16) is None  # torch runs CPU bf16 autocast everywhere
    assert "int64" in precision_support(torch.int64)  # not an autocast type: the reason names it


def test_ort_product_seconds_counts_convolution_nodes_only(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    from benchmarks.models import ort_product_seconds

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 3, 3, 3), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Exp", ["x"], ["e"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, None), helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "conv.onnx")
    products, nodes = ort_product_seconds(tmp_path / "conv.onnx", np.ones((1, 3, 64, 64), np.float32), runs=2)
    assert 0 < products < nodes  # the Exp node counts in all nodes, not in the products
