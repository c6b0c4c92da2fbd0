"""setup.py: which kernels PREFKERNELS_BUILD_CUDA builds for each torch and nvcc, and an sdist that
carries every source and header the extension needs."""
import runpy
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import setuptools

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_script():
    """setup.py's namespace, run with setuptools.setup replaced (nothing is built)."""
    patch = pytest.MonkeyPatch()
    captured = {}
    patch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    patch.chdir(REPO_ROOT)
    try:
        namespace = runpy.run_path(str(REPO_ROOT / "setup.py"), run_name="setup")
    finally:
        patch.undo()
    return namespace, captured


def nvcc_of(major):
    def run():
        return major
    return run


def test_this_machine_builds_the_cpu_kernels(setup_script):
    _, captured = setup_script
    (extension,) = captured["ext_modules"]
    assert extension.name == "prefkernels._C" and "csrc/ops.cpp" in extension.sources


@pytest.mark.parametrize("choice, torch_cuda, nvcc, major, wanted", [
    ("auto", None, "/cuda/bin/nvcc", 13, False),          # a CPU torch
    ("auto", "13.0", "/cuda/bin/nvcc", 13, True),
    ("", "13.0", "/cuda/bin/nvcc", 13, True),              # empty: auto
    ("AUTO", "13.0", None, None, False),                   # no nvcc
    ("auto", "12.8", "/cuda/bin/nvcc", 13, False),         # torch refuses another major version
    ("auto", "13.0", "/cuda/bin/nvcc", None, False),       # nvcc does not run
    ("off", "13.0", "/cuda/bin/nvcc", 13, False),
    ("0", "13.0", "/cuda/bin/nvcc", 13, False),
    ("on", "13.0", "/cuda/bin/nvcc", 13, True),
    ("1", "13.0", "/cuda/bin/nvcc", 13, True),
])
def test_build_cuda_choice(setup_script, capsys, choice, torch_cuda, nvcc, major, wanted):
    namespace, _ = setup_script
    assert namespace["cuda_wanted"](choice, torch_cuda, nvcc, nvcc_of(major)) is wanted
    said = capsys.readouterr().err
    assert ("building the CPU kernels only" in said) == (not wanted and torch_cuda is not None
                                                         and choice not in ("off", "0"))


@pytest.mark.parametrize("choice, torch_cuda, nvcc, major, message", [
    ("bogus", "13.0", "/cuda/bin/nvcc", 13, "PREFKERNELS_BUILD_CUDA='bogus': expected 0, 1 or auto"),
    ("1", None, "/cuda/bin/nvcc", 13, "cannot build the CUDA kernels: torch .* has no CUDA"),
    ("1", "13.0", None, None, "cannot build the CUDA kernels: nvcc was not found"),
    ("1", "12.8", "/cuda/bin/nvcc", 13, "torch was built with CUDA 12.8 but /cuda/bin/nvcc is CUDA 13; install a "
                                        "matching CUDA toolkit"),
])
def test_build_cuda_choice_that_cannot_be_met_stops(setup_script, choice, torch_cuda, nvcc, major, message):
    namespace, _ = setup_script
    with pytest.raises(SystemExit, match=message):
        namespace["cuda_wanted"](choice, torch_cuda, nvcc, nvcc_of(major))


def test_the_sdist_carries_every_source_and_header(tmp_path):
    """Made from a copy without a previous build's egg-info (whose file list setuptools would reuse)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(REPO_ROOT / name, source)
    shutil.copytree(REPO_ROOT / "csrc", source / "csrc")
    shutil.copytree(REPO_ROOT / "prefkernels", source / "prefkernels",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=source, check=True,
                   capture_output=True)
    (sdist,) = tmp_path.glob("prefkernels-*.tar.gz")
    with tarfile.open(sdist) as archive:
        shipped = {Path(*Path(name).parts[1:]).as_posix() for name in archive.getnames()}
    needed = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "csrc").rglob("*") if p.is_file()}
    assert needed and needed <= shipped, sorted(needed - shipped)
