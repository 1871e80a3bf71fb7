from pathlib import Path

from setuptools import find_packages, setup


setup(
    name="clip-rc",
    version="0.1.0",
    description="CLIP-RC (CVPR 2024) zero-shot semantic segmentation as a Hugging Face transformers model",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["clip_rc", "clip_rc.*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "datasets>=3.0",
        "accelerate>=1.0",
        "evaluate>=0.4.3",
        "safetensors>=0.4",
        "huggingface_hub>=0.30",
        "numpy>=1.26",
        "pillow>=10.0",
        "tqdm>=4.66",
    ],
    extras_require={
        # parameterized: transformers' common test suites, which tests/transformers_suites.py runs, import it.
        "test": ["pytest>=8", "parameterized>=0.9"],
        # ruff check / ruff format --check with the configuration in pyproject.toml, as CI runs them.
        "quality": ["ruff>=0.9"],
        "tensorboard": ["tensorboard>=2.14"],
        "plots": ["matplotlib>=3.8"],
        # clip-rc-export --format onnx (onnx, onnxscript) and the ONNX Runtime backend.
        "onnx": ["onnx>=1.21", "onnxscript>=0.7", "onnxruntime>=1.32"],
    },
    entry_points={
        "console_scripts": [
            "clip-rc-train = clip_rc.commands.train:main",
            "clip-rc-eval = clip_rc.commands.evaluate:main",
            "clip-rc-predict = clip_rc.commands.predict:main",
            "clip-rc-convert = clip_rc.commands.convert:main",
            "clip-rc-flops = clip_rc.commands.flops:main_flops",
            "clip-rc-benchmark = clip_rc.commands.speed:main",
            "clip-rc-demo = clip_rc.toy.demo:main",
            "clip-rc-export = clip_rc.commands.export:main",
        ]
    },
)
