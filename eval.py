"""Evaluate a CLIP-RC model: `python eval.py --help`, or `accelerate launch --num_processes N eval.py ...`."""

import sys

from clip_rc.commands.evaluate import main


if __name__ == "__main__":
    sys.exit(main())
