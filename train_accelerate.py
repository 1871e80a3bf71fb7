"""Train CLIP-RC with Accelerate: `python train_accelerate.py --help` or `accelerate launch train_accelerate.py ...`."""

from clip_rc.commands.train import main


if __name__ == "__main__":
    main()
