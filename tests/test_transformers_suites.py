"""The harness that runs transformers' common test suites (see `tests/transformers_suites.py`)."""

import io
import sys
import tarfile

import pytest
import transformers

from . import transformers_suites
from .transformers_suites import SUITE_PACKAGE, SuitesUnavailable, load_suites, running_under_ci


SUITE_MODULES = (
    "test_modeling_common", "test_configuration_common", "test_image_processing_common", "test_processing_common",
)  # fmt: skip


def test_common_suites_are_available():
    """The one test that fails (under CI) or skips (elsewhere) when the installed version's sdist cannot be
    fetched; the suites themselves are skipped then, so that the rest of the session still runs."""
    package, reason = load_suites()
    if package is None:
        if running_under_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    folder = transformers_suites.suites_directory()
    assert folder.name == "tests" and folder.parent.name == f"transformers-{transformers.__version__}"
    for module_name in SUITE_MODULES:
        module = transformers_suites.import_suite(module_name)
        assert module.__name__ == f"{SUITE_PACKAGE}.{module_name}"
        assert module.__file__ == str(folder / f"{module_name}.py")
    # The modules the sdist lacks are this harness's stand-ins, not copies.
    assert sys.modules[f"{SUITE_PACKAGE}.generation.test_utils"].GenerationTesterMixin is (
        transformers_suites.GenerationTesterMixin
    )
    assert sys.modules[f"{SUITE_PACKAGE}.test_modeling_common"].ModelTesterMixin.__mro__[1] is (
        transformers_suites.ExportTesterMixin
    )


def _sdist(path, version, files):
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            member = tarfile.TarInfo(f"transformers-{version}/{name}")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return path


def test_only_the_tests_folder_is_extracted(tmp_path):
    files = {
        "tests/test_modeling_common.py": "MIXIN = 1\n",
        "tests/fixtures/sample.txt": "x",
        "src/transformers/__init__.py": "",
        "setup.py": "",
    }
    archive = _sdist(tmp_path / "transformers-9.9.9.tar.gz", "9.9.9", files)

    tests_folder = transformers_suites._extract_tests(archive, "9.9.9", tmp_path / "out")

    extracted = sorted(str(path.relative_to(tmp_path / "out")) for path in (tmp_path / "out").rglob("*"))
    assert extracted == [
        "transformers-9.9.9", "transformers-9.9.9/tests", "transformers-9.9.9/tests/__init__.py",
        "transformers-9.9.9/tests/fixtures", "transformers-9.9.9/tests/fixtures/sample.txt",
        "transformers-9.9.9/tests/test_modeling_common.py",
    ]  # fmt: skip
    assert (tests_folder / "test_modeling_common.py").read_text() == "MIXIN = 1\n"
    assert (tests_folder / "__init__.py").read_text() == ""


def test_an_sdist_without_the_suites_is_refused(tmp_path):
    archive = _sdist(tmp_path / "transformers-9.9.9.tar.gz", "9.9.9", {"tests/test_other.py": ""})
    with pytest.raises(SuitesUnavailable, match=r"has no transformers-9\.9\.9/tests/test_modeling_common\.py"):
        transformers_suites._extract_tests(archive, "9.9.9", tmp_path / "out")


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(transformers_suites.CACHE_ENVIRONMENT_VARIABLE, str(tmp_path))
    assert transformers_suites.suites_directory("9.9.9") == tmp_path / "transformers-9.9.9" / "tests"
    monkeypatch.delenv(transformers_suites.CACHE_ENVIRONMENT_VARIABLE)
    assert transformers_suites.suites_directory("9.9.9") == (
        transformers_suites.DEFAULT_CACHE_ROOT / "transformers-9.9.9" / "tests"
    )


def test_a_cached_folder_is_reused_without_downloading(monkeypatch, tmp_path):
    monkeypatch.setenv(transformers_suites.CACHE_ENVIRONMENT_VARIABLE, str(tmp_path))
    cached = tmp_path / "transformers-9.9.9" / "tests"
    cached.mkdir(parents=True)
    (cached / "test_modeling_common.py").write_text("")

    def no_download(*args):
        raise AssertionError("the cached folder should have been used")

    monkeypatch.setattr(transformers_suites, "_download_sdist", no_download)
    assert transformers_suites.fetch_suites("9.9.9") == cached


def test_a_fetch_lands_in_the_cache_in_one_move(monkeypatch, tmp_path):
    monkeypatch.setenv(transformers_suites.CACHE_ENVIRONMENT_VARIABLE, str(tmp_path / "cache"))

    def fake_download(version, destination):
        destination.mkdir()
        return _sdist(destination / f"transformers-{version}.tar.gz", version, {"tests/test_modeling_common.py": ""})

    monkeypatch.setattr(transformers_suites, "_download_sdist", fake_download)
    tests_folder = transformers_suites.fetch_suites("9.9.9")

    assert tests_folder == tmp_path / "cache" / "transformers-9.9.9" / "tests"
    assert sorted(path.name for path in tests_folder.iterdir()) == ["__init__.py", "test_modeling_common.py"]
    # The download and the scratch extraction are gone: only the tests folder is kept.
    assert [path.name for path in tests_folder.parent.iterdir()] == ["tests"]
