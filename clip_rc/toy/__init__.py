"""The synthetic shapes world, the tiny CLIP trained on its captions, the demo and the quickstart."""
