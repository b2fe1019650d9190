"""Hub streaming over the Hub's own HTTP protocol: ``load_hub_dataset``, ``offseg train --hub-id`` and
``offseg evaluate --hub-id`` against the Hub stand-in (``tests/hub_stand_in.py``), with ``HF_ENDPOINT`` pointing at
it, ``HF_HUB_OFFLINE`` unset and a fresh ``HF_HOME``, in subprocesses (huggingface_hub and datasets read the
endpoint, offline flag and caches when they are imported).

The stand-in serves two tiny datasets laid out as the real repositories are:

* ``zhoubolei/scene_parse_150`` at ``refs/convert/parquet`` (the Hub's parquet export: one folder per config,
  ``scene_parsing/{train,validation}/0000.parquet``, no dataset card), columns ``image`` / ``annotation`` (raw
  ADE20K labels 0..150, 0 = other) / ``scene_category``; its ``main`` holds the old loading script only, which
  ``datasets`` 5 refuses, so a run that ignored the revision would fail;
* ``GATE-engine/COCOStuff164K`` at ``main`` (as ``push_to_hub`` writes a repo: ``data/{train,val}-00000-of-00001
  .parquet`` and a dataset card whose ``configs:`` name the splits), columns ``image`` / ``mask`` (raw COCO-Stuff
  ids).

The shards exist only in the stand-in's memory; the tests check that every row arrives decoded and
canonicalised, that each shard was fetched from the stand-in with HTTP range requests, that nothing was written
to the caches, and that an unknown dataset or revision gives one message naming it, after one request.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hub_stand_in import LocalHub

pytestmark = pytest.mark.torch_threads(1)

REPO = Path(__file__).resolve().parents[1]
ADE = "zhoubolei/scene_parse_150"
COCO = "GATE-engine/COCOStuff164K"
SIZE = (24, 32)  # height, width
COCO_RAW = [0, 11, 12, 91, 181, 255]  # person, an id COCO-Stuff leaves unused, stop sign, banner, wood, unlabeled
COCO_TRAIN_IDS = dict(zip(COCO_RAW, [0, 255, 11, 80, 170, 255]))  # as the official converter maps them
COCO_CARD = b"""---
dataset_info:
  features:
  - name: image
    dtype: image
  - name: mask
    dtype: image
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: val
    path: data/val-*
---
"""


def _rows(dataset: str, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` (RGB image, raw label map) pairs; every ADE20K map holds 0, 1 and 150, every COCO map each raw id."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        image = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
        if dataset == "ade20k":
            label = rng.integers(0, 151, SIZE, dtype=np.uint8)
            label.flat[:3] = [0, 1, 150]
        else:
            label = rng.choice(np.array(COCO_RAW, dtype=np.uint8), SIZE)
            label.flat[: len(COCO_RAW)] = COCO_RAW
        rows.append((image, label))
    return rows


def _shard(rows, label_column: str, extra: dict | None = None) -> bytes:
    """One parquet shard as ``datasets`` writes it (Image columns stored as ``{bytes, path}`` structs)."""
    import datasets

    columns = {"image": [Image.fromarray(image) for image, _ in rows],
               label_column: [Image.fromarray(label, mode="L") for _, label in rows], **(extra or {})}
    features = {"image": datasets.Image(), label_column: datasets.Image()}
    features.update({name: datasets.Value("int64") for name in extra or {}})
    buffer = io.BytesIO()
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served():
    """The rows of each (repo, split) and the files of each (repo, revision)."""
    rows = {(ADE, "train"): _rows("ade20k", 4, 0), (ADE, "validation"): _rows("ade20k", 2, 1),
            (COCO, "train"): _rows("coco-stuff", 3, 2), (COCO, "validation"): _rows("coco-stuff", 2, 3)}
    files = {
        (ADE, "refs/convert/parquet"): {
            f"scene_parsing/{split}/0000.parquet": _shard(rows[ADE, split], "annotation",
                                                          {"scene_category": list(range(len(rows[ADE, split])))})
            for split in ("train", "validation")
        },
        (ADE, "main"): {"README.md": b"# scene_parse_150\n", "scene_parse_150.py": b"import datasets\n"},
        (COCO, "main"): {"README.md": COCO_CARD,
                         "data/train-00000-of-00001.parquet": _shard(rows[COCO, "train"], "mask"),
                         "data/val-00000-of-00001.parquet": _shard(rows[COCO, "validation"], "mask")},
    }
    return rows, files


@pytest.fixture
def hub(served):
    with LocalHub() as stand_in:
        for (repo_id, revision), files in served[1].items():
            stand_in.add_dataset(repo_id, files, revision=revision)
        yield stand_in


def _env(hub: LocalHub, tmp_path: Path) -> dict:
    """This environment without any HF_* / offline setting, plus the stand-in endpoint and a fresh HF_HOME."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HF_", "HUGGINGFACE_")) and key not in ("TRANSFORMERS_OFFLINE", "DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run(argv: list[str], hub: LocalHub, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=tmp_path, env=_env(hub, tmp_path), capture_output=True,
                          text=True, timeout=600)


def _streamed_from_the_stand_in(hub: LocalHub, tmp_path: Path, shards: list[str]) -> None:
    """Each shard was read from the stand-in with range requests, and no parquet file reached a cache."""
    for shard in shards:
        ranges = [byte_range for method, path, byte_range in hub.requests if method == "GET" and path.endswith(shard)]
        assert ranges and all(byte_range and byte_range.startswith("bytes=") for byte_range in ranges), (shard, ranges)
    assert not hub.unknown_requests
    assert not list((tmp_path / "hf_home").rglob("*.parquet"))


LOAD = """
import json, sys, time
import numpy as np
from offseg_hf.data.hub import load_hub_dataset

out = {"rows": {}, "errors": {}}
for dataset, hub_id, split in json.loads(sys.argv[1]):
    out["rows"][f"{hub_id} {split}"] = [
        {"index": row["index"], "image_mode": row["image"].mode, "label_mode": row["label"].mode,
         "image": np.asarray(row["image"]).tolist(), "label": np.asarray(row["label"]).tolist()}
        for row in load_hub_dataset(hub_id, split, dataset=dataset)
    ]
for hub_id, revision in json.loads(sys.argv[2]):
    start = time.perf_counter()
    try:
        load_hub_dataset(hub_id, "train", dataset="ade20k", revision=revision)
    except Exception as error:
        out["errors"][hub_id] = {"type": type(error).__name__, "message": str(error),
                                 "seconds": time.perf_counter() - start}
print(json.dumps(out))
"""


def test_load_hub_dataset_streams_canonical_rows_over_the_hub_protocol(hub, served, tmp_path):
    rows, files = served
    splits = [["ade20k", ADE, "train"], ["ade20k", ADE, "validation"], ["coco-stuff", COCO, "train"],
              ["coco-stuff", COCO, "validation"]]
    missing = [["nobody/nothing", None], [ADE, "refs/convert/parkett"]]
    result = _run(["-c", LOAD, json.dumps(splits), json.dumps(missing)], hub, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])

    for _, hub_id, split in splits:
        streamed = out["rows"][f"{hub_id} {split}"]
        expected = rows[hub_id, split]
        assert [row["index"] for row in streamed] == list(range(len(expected))), (hub_id, split)
        for row, (image, raw) in zip(streamed, expected):
            assert (row["image_mode"], row["label_mode"]) == ("RGB", "L")
            np.testing.assert_array_equal(np.asarray(row["image"], dtype=np.uint8), image)
            if hub_id == ADE:  # reduce labels: 0 (other) -> ignored, v -> v - 1
                train_ids = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
            else:
                train_ids = np.vectorize(COCO_TRAIN_IDS.get)(raw)
            np.testing.assert_array_equal(np.asarray(row["label"]), train_ids)
    ade_label = np.asarray(out["rows"][f"{ADE} train"][0]["label"])
    assert ade_label.ravel()[:3].tolist() == [255, 0, 149]
    assert np.asarray(out["rows"][f"{COCO} train"][0]["label"]).ravel()[:6].tolist() == [0, 255, 11, 80, 170, 255]

    # the revision was asked for, URL-encoded as the Hub writes it, and the shards were streamed from the stand-in
    assert any(path.startswith(f"/api/datasets/{ADE}/revision/refs%2Fconvert%2Fparquet") for _, path, _ in hub.requests)
    shards = [path for revision_files in files.values() for path in revision_files if path.endswith(".parquet")]
    assert len(shards) == 4
    _streamed_from_the_stand_in(hub, tmp_path, shards)

    # a missing repo and a missing revision: one message naming them, at once, after one request each
    repo_error, revision_error = out["errors"]["nobody/nothing"], out["errors"][ADE]
    assert repo_error["type"] == revision_error["type"] == "FileNotFoundError"
    assert "'nobody/nothing' at revision 'main'" in repo_error["message"]
    assert f"'{ADE}' at revision 'refs/convert/parkett'" in revision_error["message"]
    assert hub.endpoint in repo_error["message"] and "\n" not in repo_error["message"] + revision_error["message"]
    assert max(repo_error["seconds"], revision_error["seconds"]) < 3
    assert [path for _, path, _ in hub.requests if "nobody/nothing" in path] == [
        "/datasets/nobody/nothing/resolve/main/README.md"]
    assert len([path for _, path, _ in hub.requests if "parkett" in path]) == 1


@pytest.mark.slow
def test_train_and_evaluate_stream_scene_parse_150_from_the_hub(hub, served, tmp_path):
    import torch

    from test_training import tiny_config
    from offseg_hf import OffSegForSemanticSegmentation
    from offseg_hf.data.registry import get_dataset_info

    torch.manual_seed(0)
    names = get_dataset_info("ade20k").class_names
    config = tiny_config(num_labels=150)
    config.id2label, config.label2id = dict(enumerate(names)), {name: i for i, name in enumerate(names)}
    OffSegForSemanticSegmentation(config).save_pretrained(tmp_path / "tiny")
    train = _run(["-m", "offseg_hf", "train", "--quiet", "--dataset", "ade20k", "--hub-id", ADE, "--model",
                  str(tmp_path / "tiny"), "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
                  "--global-batch-size", "2", "--crop-size", "32", "--train-scale", "32", "32", "--warmup-steps", "1",
                  "--eval-max-samples", "2", "--num-workers", "0", "--use-cpu"], hub, tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    assert train.stdout.startswith("final mIoU"), train.stdout
    history = json.loads((tmp_path / "run" / "log_history.json").read_text())
    assert max(entry["step"] for entry in history) == 2
    assert "eval_mIoU" in json.loads((tmp_path / "run" / "eval_results.json").read_text())

    evaluate = _run(["-m", "offseg_hf", "evaluate", "--quiet", "--model", str(tmp_path / "run"), "--dataset",
                     "ade20k", "--hub-id", ADE, "--split", "validation", "--device", "cpu", "--output-dir",
                     str(tmp_path / "eval")], hub, tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval_ade20k_validation_whole.json").read_text())
    assert report["settings"]["split"] == "validation"
    assert report["metrics"]["num_images"] == len(served[0][ADE, "validation"])
    _streamed_from_the_stand_in(hub, tmp_path, list(served[1][ADE, "refs/convert/parquet"]))


@pytest.mark.parametrize("command, hub_id, options, revision", [
    ("train", ADE, ["--dataset", "ade20k", "--dataset-revision", "refs/convert/parkett"], "refs/convert/parkett"),
    ("evaluate", "nobody/nothing", ["--dataset", "coco-stuff", "--model", "never-loaded"], "main"),
])
def test_a_missing_dataset_or_revision_is_one_clear_cli_error(hub, tmp_path, command, hub_id, options, revision):
    result = _run(["-m", "offseg_hf", command, "--hub-id", hub_id, *options, "--output-dir", str(tmp_path / "out")],
                  hub, tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    message = (f"offseg {command}: error: cannot load Hub dataset '{hub_id}' at revision '{revision}' "
               f"from {hub.endpoint}")
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len([path for _, path, _ in hub.requests if hub_id in path]) == 1  # no retries
    assert not [path for path in (tmp_path / "out").rglob("*") if path.is_file()]  # nothing written
