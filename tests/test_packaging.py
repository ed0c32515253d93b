"""What `pip install .` ships: the wheel's contents and metadata, the sdist, and (slow) an installed wheel detecting
outside the repository with the compiled C++ kernel and the bundled model.

The builds run on a copy of the checkout's files in a temporary folder, so they never write ``build/`` or
``*.egg-info`` into the repository. They use the running environment's setuptools (``--no-build-isolation``),
which requirements-dev.txt provides: nothing is downloaded.
"""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUNDLED = "ddetr/bundled/ddetr-shapes"
BUNDLED_MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")
KERNEL_SOURCE = "ddetr/ops/ms_deform_attn_cpu.cpp"
# Repository-only folders and files that must stay out of the wheel.
NOT_SHIPPED_PREFIXES = ("tests/", "benchmarks/", "app_support/", "examples/", "models/", "outputs/", "runs/")
NOT_SHIPPED_FILES = ("app.py", "ddetr/bench.py", "requirements.txt", "requirements-dev.txt")
CORE_REQUIREMENTS = ("torch", "numpy", "pillow", "scipy", "safetensors", "huggingface-hub")
EXTRA_REQUIREMENTS = {
    "train": ("datasets", "pycocotools", "tqdm", "defusedxml", "pyyaml"),
    "app": ("ddetr", "gradio", "gradio-image-annotation", "pandas"),
    "export": ("onnx", "onnxruntime"),
    "video": ("av", "tqdm"),
}
BUILD_TIMEOUT_S = 300
INSTALL_TIMEOUT_S = 300
DETECT_TIMEOUT_S = 900


def _source_files() -> list[str]:
    """The checkout as a build would see it: tracked and untracked-but-not-ignored files that exist."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know which files belong to the project")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted({name for name in listed.split("\0") if name and (REPO / name).is_file()})


def _run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("source") / "ddetr"
    for name in _source_files():
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    return copy


@pytest.fixture(scope="module")
def wheel(source_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel .`` of the copied checkout."""
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir"]
    _run([*command, "--wheel-dir", str(out), "."], BUILD_TIMEOUT_S, cwd=source_copy)
    (built,) = out.glob("ddetr-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_wheel_ships_the_kernel_source_and_the_bundled_model(wheel_names: list[str]) -> None:
    names = set(wheel_names)
    assert KERNEL_SOURCE in names
    for file in BUNDLED_MODEL_FILES:
        assert f"{BUNDLED}/{file}" in names
    # The model card's curves, training logs and script stay in the repository.
    assert not [name for name in names if name.startswith(f"{BUNDLED}/") and name.endswith((".png", ".jsonl", ".sh"))]
    # Every Python module of both packages is there.
    assert "ddetr/__init__.py" in names and "finetune/__init__.py" in names
    for module in (
        "ddetr/ops/ms_deform_attn_cpu.py",
        "ddetr/checkpoint/default_model.py",
        "ddetr/export/__main__.py",
        "ddetr/annotate/__main__.py",
        "ddetr/video/reader.py",
        "ddetr/tracking/byte_tracker.py",
        "finetune/cli.py",
    ):
        assert module in names


def test_wheel_leaves_out_repository_only_files(wheel_names: list[str]) -> None:
    shipped = [name for name in wheel_names if ".dist-info/" not in name]
    assert not [name for name in shipped if name.startswith(NOT_SHIPPED_PREFIXES)]
    assert not [name for name in shipped if name in NOT_SHIPPED_FILES]
    assert {name.split("/", 1)[0] for name in shipped} == {"ddetr", "finetune"}
    assert not [name for name in shipped if name.endswith((".pyc", ".so", ".dylib"))]


def archive_text(wheel: Path, suffix: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [name for name in archive.namelist() if name.endswith(suffix)]
        return archive.read(name).decode()


def test_wheel_metadata_declares_dependencies_and_extras(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        (metadata_name,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())

    def requirement_name(requirement: str) -> str:
        name = requirement.split(";", 1)[0]
        for separator in "[<>=!~ ":
            name = name.split(separator, 1)[0]
        return name.strip().lower().replace("_", "-")

    requirements = metadata.get_all("Requires-Dist") or []
    core = {requirement_name(line) for line in requirements if "extra ==" not in line}
    assert core == set(CORE_REQUIREMENTS)
    assert set(EXTRA_REQUIREMENTS) <= set(metadata.get_all("Provides-Extra") or [])
    for extra, expected in EXTRA_REQUIREMENTS.items():
        listed = {requirement_name(line) for line in requirements if f'extra == "{extra}"' in line}
        assert set(expected) <= listed, (extra, listed)
    assert metadata["Name"] == "ddetr"
    entry_points = archive_text(wheel, ".dist-info/entry_points.txt")
    assert "ddetr-annotate = ddetr.annotate.cli:main" in entry_points


def test_sdist_carries_the_package_data_and_rebuilds_the_wheel(source_copy: Path, tmp_path: Path) -> None:
    """The source distribution (what `pip install ddetr-*.tar.gz` builds from) carries the package data too."""
    hook = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    result = _run([sys.executable, "-c", hook, str(tmp_path)], BUILD_TIMEOUT_S, cwd=source_copy)
    sdist = tmp_path / result.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        root = archive.getnames()[0].split("/", 1)[0]
        names = {name.removeprefix(f"{root}/") for name in archive.getnames()}
        archive.extractall(tmp_path / "unpacked", filter="data")
    assert {"pyproject.toml", "README.md", KERNEL_SOURCE} <= names
    assert {f"{BUNDLED}/{file}" for file in BUNDLED_MODEL_FILES} <= names

    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir"]
    _run([*command, "--wheel-dir", str(tmp_path / "wheel"), "."], BUILD_TIMEOUT_S, cwd=tmp_path / "unpacked" / root)
    (rebuilt,) = (tmp_path / "wheel").glob("ddetr-*.whl")
    with zipfile.ZipFile(rebuilt) as archive:
        assert {KERNEL_SOURCE, *(f"{BUNDLED}/{file}" for file in BUNDLED_MODEL_FILES)} <= set(archive.namelist())


# Runs in the fresh environment, from a folder outside the repository.
DETECT_SCRIPT = textwrap.dedent(
    """
    import json, logging, os, sys, warnings
    from pathlib import Path

    from PIL import Image, ImageDraw

    import ddetr
    from ddetr.checkpoint import default_model
    from ddetr.ops import ms_deform_attn_cpu

    prefix = Path(sys.prefix).resolve()
    package = Path(ddetr.__file__).resolve()
    assert package.is_relative_to(prefix), f"ddetr imported from {package}, not from the environment {prefix}"
    kernel_source = Path(ms_deform_attn_cpu.__file__).with_name("ms_deform_attn_cpu.cpp")
    assert kernel_source.is_file(), kernel_source
    cache = Path(os.environ["DDETR_CACHE_DIR"])
    assert not list(cache.glob("msda_cpu_*")), "the kernel cache must start empty"

    chosen = default_model.default_model()
    assert Path(chosen.source).resolve() == default_model.BUNDLED_MODEL_DIR.resolve(), chosen
    assert Path(chosen.source).resolve().is_relative_to(prefix), chosen

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("ddetr.pipeline").addHandler(handler)
    logging.getLogger("ddetr.pipeline").setLevel(logging.INFO)
    detector = ddetr.pipeline()

    image = Image.new("RGB", (256, 256), (235, 235, 225))
    draw = ImageDraw.Draw(image)
    draw.ellipse([20, 20, 100, 100], fill=(200, 30, 30))
    draw.rectangle([140, 30, 220, 110], fill=(30, 60, 200))
    draw.polygon([(60, 230), (20, 150), (110, 160)], fill=(30, 160, 60))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        detections = detector(image, threshold=0.3)
    # The first inference built the kernel into the (empty) cache and loaded it: no fallback to pure PyTorch.
    assert not [str(w.message) for w in caught if "C++" in str(w.message)], [str(w.message) for w in caught]
    built = sorted(path.name for path in cache.glob("msda_cpu_*") if not path.name.endswith(".partial"))
    loaded = ms_deform_attn_cpu.cpp_extension_path()
    assert loaded is not None, "the pure-PyTorch fallback is in use"
    assert loaded.parent == cache and loaded.name in built, (loaded, built)

    # And the detector's attention runs through it.
    kernels = ms_deform_attn_cpu.load_cpp_extension()
    calls = []
    for dtype, function in list(kernels.forward.items()):
        def counted(*args, _function=function, _dtype=dtype):
            calls.append(str(_dtype))
            return _function(*args)
        kernels.forward[dtype] = counted
    again = detector(image, threshold=0.3)
    assert calls, "the C++ forward kernel was not called"
    assert again == detections

    print(json.dumps({
        "package": str(package),
        "model": chosen.source,
        "log": messages,
        "kernel": str(loaded),
        "kernel_calls": len(calls),
        "labels": sorted({d["label"] for d in detections}),
    }))
    """
)


@pytest.mark.slow
def test_installed_wheel_detects_with_the_cpp_kernel_and_the_bundled_model(wheel: Path, tmp_path: Path) -> None:
    """Install the wheel into a new environment (its dependencies come from the running one, nothing is
    downloaded) and detect from a folder outside the repository, offline, with an empty kernel cache."""
    environment = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(environment)], INSTALL_TIMEOUT_S)
    python = environment / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site_packages = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60).stdout.strip()
    )
    # The running environment's packages (torch, numpy, ...) after the new environment's own: a `.pth` line is
    # appended to sys.path, so the installed ddetr comes first. (`--system-site-packages` would expose the base
    # interpreter's packages, not those of the virtual environment running the tests.)
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site_packages / "outer_environment.pth").write_text("".join(f"{path}\n" for path in sorted(outer)))
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index"]
    _run([*install, "--no-cache-dir", str(wheel)], INSTALL_TIMEOUT_S)

    work = tmp_path / "work"
    work.mkdir()
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")
        and not key.startswith("DDETR_")
    }
    # Offline with an empty hub cache, so the default is the bundled model; a fresh kernel cache, so the kernel is
    # compiled from the wheel's source.
    environ.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), DDETR_CACHE_DIR=str(tmp_path / "kernels"))
    script = work / "detect.py"
    script.write_text(DETECT_SCRIPT)
    result = _run([str(python), "-I", str(script)], DETECT_TIMEOUT_S, cwd=work, env=environ)
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert Path(report["package"]).is_relative_to(site_packages.resolve())
    assert not Path(report["package"]).is_relative_to(REPO)
    assert Path(report["model"]).is_relative_to(site_packages.resolve())
    assert any("bundled ddetr-shapes" in message for message in report["log"]), report["log"]
    assert Path(report["kernel"]).parent == tmp_path / "kernels"
    assert report["kernel_calls"] > 0
    assert {"circle", "square", "triangle"} <= set(report["labels"]), report
