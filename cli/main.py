"""The `predq` command."""
from __future__ import annotations

import argparse
import sys

from cli import stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="predq", description="Predictions from scikit-learn models.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the API, a worker and beat (and a Redis-compatible server when REDIS_URL is unset)")
    up.add_argument("--port", type=int, default=None, help="web port (default $PORT or 8000)")
    up.add_argument("--no-demo", action="store_true", help="do not install the demo models into an empty MODELS_DIR")

    demo = sub.add_parser("demo-models", help="train and install the demo models")
    demo.add_argument("--dir", default=None, help="models directory (default $MODELS_DIR or ./models)")

    sha = sub.add_parser("record-sha256", help="record a model file's sha256 in its model.json, so a changed file is refused")
    sha.add_argument("model_file", nargs="+")

    args = parser.parse_args(argv)
    if args.command == "up":
        return stack.up(port=args.port, demo=not args.no_demo)
    if args.command == "demo-models":
        from shared.demo import install_demo_models
        from shared.settings import get_settings

        for path in install_demo_models(args.dir or get_settings().MODELS_DIR):
            print(f"installed {path}")
        return 0
    if args.command == "record-sha256":
        from shared.demo import record_sha256

        for path in args.model_file:
            print(f"{path}: sha256 {record_sha256(path)['sha256']}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
