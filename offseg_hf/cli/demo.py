"""``offseg demo --model DIR_OR_REPO [--model …] [--host 127.0.0.1] [--port N]``: the web demo (Gradio).

``--export-space DIR`` writes a Hugging Face Space (``app.py``, ``requirements.txt``, ``README.md`` and a copy
of the package) for the models instead of serving. Gradio is the optional extra ``offseg-hf[demo]``; without
it this command prints how to install it (exit status 2). See :mod:`offseg_hf.inference.demo`.
"""

from __future__ import annotations

import argparse
import sys

from offseg_hf.cli.predict import add_protocol_arguments, check_protocol_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = 'Needs the demo extra: pip install "offseg-hf[demo]".'
    parser.add_argument(
        "--model", action="append", required=True, metavar="DIR_OR_REPO",
        help="model folder (config.json + weights) or Hub id; repeat to offer several models in a drop-down",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default: 127.0.0.1, this machine only; 0.0.0.0 for the network)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    add_protocol_arguments(parser)
    parser.add_argument("--max-file-size", default="200mb", metavar="SIZE",
                        help="largest accepted upload, e.g. 50mb or 1gb (default: 200mb)")
    parser.add_argument("--no-examples", action="store_true", help="do not offer the generated synthetic example scenes")
    parser.add_argument(
        "--export-space", default=None, metavar="DIR",
        help="do not serve: write a Hugging Face Space for the --model repos into DIR (app.py, requirements.txt, "
        "README.md, a copy of offseg_hf), ready for huggingface_hub.upload_folder(repo_type='space')",
    )


def run(args: argparse.Namespace) -> int:
    from offseg_hf.inference.demo import DemoUnavailableError

    try:
        check_protocol_arguments(args)
        if not 1 <= args.port <= 65535:
            raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    except ValueError as error:
        print(f"offseg demo: {error}", file=sys.stderr)
        return 2
    try:
        if args.export_space is not None:
            from offseg_hf.inference.demo import export_space

            written = export_space(args.export_space, args.model)
            print("wrote " + ", ".join(str(path) for path in written) + f" and {args.export_space}/offseg_hf/")
            print(
                "publish it with: python -c \"from huggingface_hub import upload_folder; "
                f"upload_folder(repo_id='USER/SPACE', repo_type='space', folder_path='{args.export_space}')\""
            )
            return 0
        from offseg_hf.inference.demo import build_demo, launch_demo
        from offseg_hf.inference.predict import ModelLoadError

        try:
            demo = build_demo(args.model, device=args.device, protocol=args.protocol, scale=args.scale,
                              examples=not args.no_examples)
        except ModelLoadError as error:
            print(f"offseg demo: {error}", file=sys.stderr)
            return 2
        print(f"offseg demo: serving {', '.join(args.model)} on http://{args.host}:{args.port} (Ctrl+C stops)", flush=True)
        launch_demo(demo, host=args.host, port=args.port, max_file_size=args.max_file_size)
        return 0
    except DemoUnavailableError as error:
        print(f"offseg demo: {error}", file=sys.stderr)
        return 2
