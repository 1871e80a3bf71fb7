"""
transformers' own common test suites, run against CLIP-RC.

At test time, the source distribution of the installed transformers version is fetched from the package index
(`pip download --no-binary :all: --no-deps transformers==<version>`), only its `tests/` folder is extracted into a
cache folder (`$CLIP_RC_TEST_CACHE`, default `~/.cache/clip-rc-tests`, one sub-folder per version; fetched once,
then reused), and that folder is imported as the package `transformers_tests` (our own test package already holds the
name `tests`). Nothing of it is copied into this repository and none of its files is edited.

When the sources cannot be fetched, the suites are skipped with the reason, and `test_common_suites_are_available`
fails with it under CI (`CI=true`) and is skipped elsewhere.
"""

import importlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from functools import cache
from pathlib import Path

import pytest
import transformers


SUITE_PACKAGE = "transformers_tests"
CACHE_ENVIRONMENT_VARIABLE = "CLIP_RC_TEST_CACHE"
DEFAULT_CACHE_ROOT = Path.home() / ".cache" / "clip-rc-tests"
PIP_DOWNLOAD_TIMEOUT_SECONDS = 600
# Markers the suites use, registered by transformers' own conftest (see `pytest_configure` in our conftest).
SUITE_MARKERS = (
    "accelerate_tests", "slow", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test",
)  # fmt: skip
# A file of each suite: its presence marks a complete extraction (the folder is only ever moved in whole).
COMPLETE_MARKER = "test_modeling_common.py"


class SuitesUnavailable(RuntimeError):
    """The sources of transformers' common suites could not be fetched."""


def suites_directory(version: str = transformers.__version__) -> Path:
    """Where the `tests/` folder of transformers `version` is (or will be) extracted."""
    cache_root = Path(os.environ.get(CACHE_ENVIRONMENT_VARIABLE) or DEFAULT_CACHE_ROOT).expanduser()
    return cache_root / f"transformers-{version}" / "tests"


def _download_sdist(version: str, destination: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--disable-pip-version-check",
        "--dest", str(destination), f"transformers=={version}",
    ]  # fmt: skip
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=PIP_DOWNLOAD_TIMEOUT_SECONDS)
    except subprocess.CalledProcessError as error:
        last_lines = "\n".join(error.stderr.strip().splitlines()[-5:])
        raise SuitesUnavailable(f"`{' '.join(command)}` failed (exit {error.returncode}):\n{last_lines}") from error
    except subprocess.TimeoutExpired as error:
        raise SuitesUnavailable(f"`{' '.join(command)}` took over {PIP_DOWNLOAD_TIMEOUT_SECONDS} s.") from error
    archives = sorted(destination.glob("transformers-*.tar.gz"))
    if not archives:
        raise SuitesUnavailable(f"pip downloaded no transformers sdist into {destination}: {os.listdir(destination)}")
    return archives[0]


def _extract_tests(archive: Path, version: str, destination: Path) -> Path:
    """Extract only the archive's `tests/` folder (no model tests are in the sdist: a few MB)."""
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(archive) as sdist:
        members = [member for member in sdist.getmembers() if member.name.startswith(prefix)]
        if not any(member.name == prefix + COMPLETE_MARKER for member in members):
            raise SuitesUnavailable(f"{archive.name} has no {prefix}{COMPLETE_MARKER}.")
        sdist.extractall(destination, members=members, filter="data")
    tests_folder = destination / prefix
    # The repository's `tests/__init__.py` is empty and the sdist leaves it out. `test_configuration_common` runs
    # `direct_transformers_import(<its folder>)`, which executes that file (and then returns the installed
    # transformers), so the folder needs it; it is also what makes the folder a regular package.
    (tests_folder / "__init__.py").touch()
    return tests_folder


def fetch_suites(version: str = transformers.__version__) -> Path:
    """The extracted `tests/` folder of transformers `version`, fetched into the cache on first use."""
    target = suites_directory(version)
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        archive = _download_sdist(version, Path(scratch) / "download")
        extracted = _extract_tests(archive, version, Path(scratch) / "extract")
        try:
            # Atomic: a concurrent or interrupted fetch never leaves a half-extracted folder in the cache.
            os.replace(extracted, target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():
                raise
    return target


def _stand_in_module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


class GenerationTesterMixin:
    """Stand-in for `tests/generation/test_utils.py`, which the sdist lacks: the real mixin tests `generate()`,
    which CLIP-RC models cannot call (`test_generation_tester_mixin_inheritance` checks that testers of models
    that cannot generate do not inherit it)."""


class ExportTesterMixin:
    """Stand-in for `tests/exporters/test_export.py`, which the sdist lacks: the real mixin exports every model
    class through `transformers.exporters` backends (dynamo, ONNX, OpenVINO, ExecuTorch...), slow tests that mostly
    need backends not installed here."""


# Stand-in for `tests/utils/test_configuration_utils.py`, which the sdist lacks (the rest of that file tests the
# Hub and other models). `ConfigTester.check_config_arguments_init` builds a config from these kwargs and checks
# that each one is kept; the real dict sets every common `PreTrainedConfig` argument of transformers 5 to a
# non-default value, as here. (Composite configs such as CLIP-RC's return before reading it.)
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}


def _url_to_local_path(url: str, return_url_if_not_found: bool = True) -> str:
    """transformers' CI pre-downloads some test images next to the tests; without them the URL is used as is."""
    filename = url.split("/")[-1]
    return url if not os.path.exists(filename) and return_url_if_not_found else filename


def _install_stand_ins():
    """Register the modules the suites import but the sdist lacks, before importing the suites."""
    stand_ins = {
        f"{SUITE_PACKAGE}.generation": {"__path__": []},
        f"{SUITE_PACKAGE}.generation.test_utils": {"GenerationTesterMixin": GenerationTesterMixin},
        f"{SUITE_PACKAGE}.exporters": {"__path__": []},
        f"{SUITE_PACKAGE}.exporters.test_export": {"ExportTesterMixin": ExportTesterMixin},
        f"{SUITE_PACKAGE}.utils": {"__path__": []},
        f"{SUITE_PACKAGE}.utils.test_configuration_utils": {"config_common_kwargs": CONFIG_COMMON_KWARGS},
        # `utils/fetch_hub_objects_for_ci.py` of the transformers repository, a CI download script; the suites use
        # its URL-to-local-file lookup only.
        "fetch_hub_objects_for_ci": {"url_to_local_path": _url_to_local_path},
    }
    for name, attributes in stand_ins.items():
        sys.modules.setdefault(name, _stand_in_module(name, **attributes))


def _import_suites_package(tests_folder: Path) -> types.ModuleType:
    if SUITE_PACKAGE in sys.modules:
        return sys.modules[SUITE_PACKAGE]
    spec = importlib.util.spec_from_file_location(
        SUITE_PACKAGE, tests_folder / "__init__.py", submodule_search_locations=[str(tests_folder)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[SUITE_PACKAGE] = package
    spec.loader.exec_module(package)
    return package


@cache
def load_suites() -> tuple[types.ModuleType | None, str | None]:
    """The `transformers_tests` package, or `None` and the reason it is unavailable (kept: one fetch per session)."""
    try:
        tests_folder = fetch_suites()
    except SuitesUnavailable as error:
        return None, f"transformers' common test suites are unavailable: {error}"
    _install_stand_ins()
    return _import_suites_package(tests_folder), None


def running_under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def import_suite(module_name: str) -> types.ModuleType:
    """
    Import one of transformers' common suites (e.g. `"test_modeling_common"`) for a test module, or skip the module
    when the sources cannot be fetched: `test_transformers_suites.py::test_common_suites_are_available` then fails
    under CI with the reason (a failing import would stop the whole test session instead).
    """
    package, reason = load_suites()
    if package is None:
        pytest.skip(reason, allow_module_level=True)
    return importlib.import_module(f"{package.__name__}.{module_name}")
