#!/usr/bin/env python
"""Publish a saved DECD model to the Hugging Face Hub, with its model card.

    python examples/push_to_hub.py outputs/decd-tiny-synthetic your-name/decd-tiny-synthetic \
        --dataset_name synthetic

Uploads the inference model (decoder detached unless --keep_decoder), config + custom code for
`trust_remote_code=True`, the processor, the Inference Endpoints `handler.py`, an example crop and a
model card whose measured results come from the folder's `all_results.json` (written by
`examples/train.py`). Log in first (`hf auth login`) or set HF_TOKEN; HF_ENDPOINT selects a mirror.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import argparse  # noqa: E402
import logging  # noqa: E402

from decd.hub import publish  # noqa: E402
from decd.hub.results import DATASETS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Publish a saved DECD model to the Hugging Face Hub.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("saved_folder", help="folder written by save_pretrained / examples/train.py")
    parser.add_argument("repo_id", help="Hub repository, namespace/name (created when missing)")
    parser.add_argument("--keep_decoder", action="store_true",
                        help="upload the training-only decoder too (a training checkpoint, not an inference model)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dataset_name", default="synthetic",
                        help=f"dataset the results in all_results.json were measured on ({', '.join(DATASETS)})")
    parser.add_argument("--base_model", default=None,
                        help="CLIP checkpoint training started from; None: the one recorded in config.json")
    parser.add_argument("--license", default="apache-2.0", help="license id of the weights")
    parser.add_argument("--token", default=None, help="Hub token; None: the logged-in one or HF_TOKEN")
    parser.add_argument("--commit_message", default="Upload DECD model")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    folder = Path(args.saved_folder)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} has no config.json: pass a folder written by save_pretrained or train.py.")
    card_kwargs = {"license": args.license}
    if args.base_model is not None:
        card_kwargs["base_model"] = args.base_model
    url = publish(folder, args.repo_id, keep_decoder=args.keep_decoder, private=args.private, token=args.token,
                  commit_message=args.commit_message, dataset_name=args.dataset_name, **card_kwargs)
    print(f"Published {folder} to {url}")
    return url


if __name__ == "__main__":
    main()
