"""Speed and memory benchmark of CLIP-RC (see `clip_rc/benchmark.py`); also installed as `clip-rc-benchmark`."""

from clip_rc.commands.speed import main


if __name__ == "__main__":
    main()
