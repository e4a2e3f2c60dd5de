#!/usr/bin/env python
"""Publish the person-search demo (app.py) as a Hugging Face Space.

    python scripts/push_space.py --space org/decd-demo --model org/decd-cuhk-pedes [--gallery path/to/crops]

Creates the Gradio Space if needed and uploads app.py, the model code, the `decd` package,
requirements.txt, a README.md with the Space header and `space_config.json` naming the model (a Hub id
the Space downloads at start-up) and the gallery: a local folder of crops or an index is copied into
the Space; without --gallery the Space searches the synthetic benchmark's test split. Log in first
(`hf auth login`) or set HF_TOKEN. See `decd.hub.publish_space`.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decd.hub import publish_space  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", required=True, help="the Space's id, namespace/name")
    parser.add_argument("--model", required=True, help="the DECD model's Hub id the Space loads")
    parser.add_argument("--gallery", default=None,
                        help="a local folder of crops or an index folder (copied), or a path on the Space's "
                             "machine; default: the synthetic test split")
    parser.add_argument("--title", default="DECD person search")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one / HF_TOKEN)")
    arguments = parser.parse_args(argv)
    url = publish_space(arguments.space, arguments.model, arguments.gallery, private=arguments.private,
                        token=arguments.token, title=arguments.title)
    print(f"Space: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
