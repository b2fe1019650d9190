"""``python -m benchmarks.soak_demo``: serve ``offseg demo`` and load it for a while (a soak test, not part of the
test run).

Starts ``offseg demo`` in a child process with a private temporary directory (``TMPDIR``), then ``--clients``
threads, each its own ``gradio_client.Client``, send ``--requests`` requests in all (or stop after ``--minutes``):
synthetic scenes of several sizes, and every ``1/--bad-fraction``-th request a bad upload (a text file named
``.png``, or a PNG cut in half). It records each request's latency and outcome and the server's resident memory
(``VmRSS`` of ``/proc/PID/status``) after each answered request, then stops the server with SIGTERM and lists what
it left in its temporary directory.

Reports the success rate of good requests, whether every bad upload got a message, latency percentiles, the RSS
curve (every ``--every`` requests) and RSS after request 200 and after the last; ``--out FILE`` writes all of it
as JSON. Linux only (``/proc``).
"""

EXAMPLES = """
  python -m benchmarks.soak_demo --model outputs/quickstart --requests 1000 --clients 8 --bad-fraction 0.1
  python -m benchmarks.soak_demo --model outputs/quickstart --minutes 60 --clients 8 --out soak.json
"""


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="model folder (or Hub id) the demo serves")
    parser.add_argument("--requests", type=int, default=1000, help="requests in all (default: 1000)")
    parser.add_argument("--minutes", type=float, default=None, help="stop sending after this many minutes (default: no limit)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent gradio_client clients (default: 8)")
    parser.add_argument("--bad-fraction", type=float, default=0.1, help="share of bad uploads (default: 0.1)")
    parser.add_argument("--every", type=int, default=100, help="RSS curve step in requests (default: 100)")
    parser.add_argument("--port", type=int, default=0, help="port of the demo (default: a free one)")
    parser.add_argument("--scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                        help="the demo's --scale (default: the protocol's)")
    parser.add_argument("--out", default=None, help="write the report as JSON to this file")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (``VmRSS``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def write_uploads(folder) -> tuple[list, list]:
    """Good uploads (synthetic scenes of four sizes) and bad ones (a text file named .png, a PNG cut in half)."""
    from PIL import Image

    from offseg_hf.data.synthetic import SyntheticScenes

    good = []
    for index, size in enumerate([(192, 256), (240, 320), (384, 512), (300, 200)]):
        image, _ = SyntheticScenes(num_labels=8, image_size=size, seed=index).generate(index, "validation")
        path = folder / f"scene_{size[1]}x{size[0]}.png"
        Image.fromarray(image).save(path)
        good.append(path)
    notes = folder / "notes.png"
    notes.write_text("not an image\n")
    cut = folder / "cut.png"
    cut.write_bytes(good[0].read_bytes()[: good[0].stat().st_size // 2])
    return good, [notes, cut]


def percentile(values, q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def run(args) -> int:
    import json
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import threading
    import time
    import urllib.request
    from pathlib import Path

    from gradio_client import Client, handle_file

    if not 0 <= args.bad_fraction < 1:
        raise ValueError(f"--bad-fraction must be in [0, 1), got {args.bad_fraction}")
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    server_tmp = work / "server-tmp"
    server_tmp.mkdir()
    good, bad = write_uploads(work)
    port = args.port or _free_port()
    command = [sys.executable, "-m", "offseg_hf", "demo", "--model", args.model, "--port", str(port), "--device", "cpu"]
    if args.scale:
        command += ["--scale", *map(str, args.scale)]
    env = dict(os.environ, TMPDIR=str(server_tmp), PYTHONUNBUFFERED="1")
    env.pop("GRADIO_TEMP_DIR", None)
    log_path = work / "server.log"
    log = open(log_path, "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"offseg demo did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
    rss_start = rss_bytes(server.pid)
    print(f"demo up (pid {server.pid}, RSS {rss_start / 2**20:.0f} MiB); {args.requests} requests from "
          f"{args.clients} clients, {100 * args.bad_fraction:.0f} % bad uploads", flush=True)

    bad_every = round(1 / args.bad_fraction) if args.bad_fraction else 0
    lock = threading.Lock()
    counter = iter(range(args.requests))
    records: list[dict] = []
    rss_after: dict[int, int] = {}
    stop_at = time.monotonic() + 60 * args.minutes if args.minutes else None

    def client_loop(number: int) -> None:
        client = Client(url, verbose=False, download_files=False)  # answers as URLs: no copies here
        endpoint = "/segment"
        while True:
            with lock:
                index = next(counter, None)
            if index is None or (stop_at is not None and time.monotonic() > stop_at):
                return
            is_bad = bool(bad_every) and index % bad_every == bad_every - 1
            path = bad[index // bad_every % len(bad)] if is_bad else good[index % len(good)]
            start = time.perf_counter()
            try:
                overlay, labels, _table, status, *_ = client.predict(
                    handle_file(str(path)), args.model, "whole", False, 0.5, -1, api_name=endpoint)
                status_text = status.get("value", "") if isinstance(status, dict) else str(status)
                if is_bad:
                    ok = "Cannot read" in status_text and overlay is None
                else:
                    ok = "Model time" in status_text and overlay is not None and labels is not None
                error = None if ok else status_text[:200]
            except Exception as failure:  # noqa: BLE001 - a failed request is a result to report
                ok, error = False, f"{type(failure).__name__}: {failure}"[:300]
            seconds = time.perf_counter() - start
            with lock:
                records.append({"index": index, "bad": is_bad, "ok": ok, "seconds": seconds, "error": error,
                                "file": path.name, "client": number})
                done = len(records)
                try:
                    rss_after[done] = rss_bytes(server.pid)
                except (OSError, RuntimeError):
                    pass
                if done % args.every == 0:
                    print(f"{done:5d} requests  RSS {rss_after.get(done, 0) / 2**20:7.1f} MiB", flush=True)

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(n,), daemon=True) for n in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started

    server.send_signal(signal.SIGTERM)
    try:
        exit_code = server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        exit_code = "killed after 60 s (SIGTERM ignored)"
    log.close()
    left = sorted(p.name for p in server_tmp.iterdir())

    goods = [r for r in records if not r["bad"]]
    bads = [r for r in records if r["bad"]]
    latencies = [r["seconds"] for r in records]
    done = len(records)
    mark = min(200, done)
    report = {
        "model": args.model, "clients": args.clients, "requests": done, "seconds": elapsed,
        "good": len(goods), "good_answered": sum(r["ok"] for r in goods),
        "bad": len(bads), "bad_with_message": sum(r["ok"] for r in bads),
        "latency_s": {q: percentile(latencies, float(q[1:])) for q in ("p50", "p90", "p99")} | {"max": max(latencies, default=0)},
        "rss_mib": {"start": rss_start / 2**20, f"after_{mark}": rss_after.get(mark, 0) / 2**20,
                    f"after_{done}": rss_after.get(done, 0) / 2**20},
        "rss_curve_mib": {n: rss_after[n] / 2**20 for n in sorted(rss_after) if n % args.every == 0 or n == done},
        "server_exit": exit_code, "left_in_temp_dir": left,
        "failures": [r for r in records if not r["ok"]][:20],
    }
    growth = (report["rss_mib"][f"after_{done}"] / report["rss_mib"][f"after_{mark}"] - 1) if rss_after.get(mark) else float("nan")
    report["rss_growth_after_request_200"] = growth
    print(f"\n{done} requests in {elapsed:.0f} s from {args.clients} clients: good answered "
          f"{report['good_answered']}/{len(goods)}, bad uploads with a message {report['bad_with_message']}/{len(bads)}")
    print("latency p50 {p50:.2f} s, p90 {p90:.2f} s, p99 {p99:.2f} s, max {max:.2f} s".format(**report["latency_s"]))
    print(f"RSS: start {rss_start / 2**20:.0f} MiB, after request {mark} {report['rss_mib'][f'after_{mark}']:.0f} MiB, "
          f"after request {done} {report['rss_mib'][f'after_{done}']:.0f} MiB ({100 * growth:+.1f} %)")
    print("RSS curve (MiB): " + ", ".join(f"{n}: {v:.0f}" for n, v in report["rss_curve_mib"].items()))
    print(f"server exit status after SIGTERM: {exit_code}; left in its temporary directory: {left or 'nothing'}")
    for failure in report["failures"][:5]:
        print(f"failed: {failure}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    from offseg_hf.cli import run_tool

    sys.exit(run_tool(sys.modules[__name__]))
