"""README's hosting section against what the Space is built from: the front matter and requirements.txt."""

from __future__ import annotations

import contextlib
import io
import re

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from app_support.paths import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
# The Python versions ZeroGPU runs (hosting notes, §4), and the one CI runs.
ZEROGPU_PYTHONS = ("3.10", "3.12")
CI_PYTHON = "3.11"


def front_matter() -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", README, re.DOTALL)
    assert match, "README.md must start with the Space's front matter"
    return yaml.safe_load(match.group(1))


def hosting_section() -> str:
    match = re.search(r"^### Hosting: .*?(?=^### )", README, re.DOTALL | re.MULTILINE)
    assert match, "README.md has no hosting section"
    return match.group(0)


def requirements() -> dict[str, Requirement]:
    lines = (REPO_ROOT / "requirements.txt").read_text().splitlines()
    parsed = [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]
    return {requirement.name.lower(): requirement for requirement in parsed}


def test_the_front_matter_builds_a_zerogpu_gradio_space_with_sign_in():
    meta = front_matter()
    assert meta["sdk"] == "gradio" and (REPO_ROOT / meta["app_file"]).is_file()
    assert meta["python_version"] in ZEROGPU_PYTHONS
    assert meta["hf_oauth"] is True and {"read-repos", "write-repos"} <= set(meta["hf_oauth_scopes"])
    gradio = requirements()["gradio"]
    assert "oauth" in gradio.extras  # the sign-in button needs authlib and itsdangerous
    assert Version(meta["sdk_version"]) in gradio.specifier  # the Space's Gradio is one requirements.txt accepts


def test_every_requirement_installs_on_the_space_and_on_ci():
    wanted = requirements()
    for python in (front_matter()["python_version"], CI_PYTHON):
        environment = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux"}
        names = {name for name, item in wanted.items() if item.marker is None or item.marker.evaluate(environment)}
        assert {"torch", "gradio", "spaces", "av"} <= names, python
    # av 19 needs Python 3.12: the bound must still admit av 18, the newest that installs on 3.11.
    assert Version("18.1") in wanted["av"].specifier
    assert Version("0.51.3") in wanted["spaces"].specifier  # Requires-Python >=3.10,<3.15: both


def test_the_hosting_section_says_what_the_front_matter_and_requirements_do():
    section, meta = hosting_section(), front_matter()
    assert f'`python_version: "{meta["python_version"]}"`' in section
    assert (
        meta["sdk_version"] in section
        and "`hf_oauth: true`" in section
        and "`read-repos`" in section
        and "`write-repos`" in section
    )
    for hardware in ("**ZeroGPU**", "**CPU**", "**dedicated GPU**"):
        assert hardware in section
    for package in ("`spaces`", "`gradio[oauth]`"):
        assert package in section
    # Every app flag it names (``--live-*``: a family) is one `python app.py --help` lists.
    named = {flag for flag in re.findall(r"`(--[a-z][a-z-]*)", section) if flag != "--push-to-hub"}
    options = app_options()
    unknown = {flag for flag in named if not any(option.startswith(flag) for option in options)}
    assert {"--training", "--precision", "--live-", "--video-"} <= named and not unknown, unknown


def app_options() -> set[str]:
    from app import parse_args

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
        parse_args(["--help"])
    return set(re.findall(r"(--[a-z][a-z-]+)", buffer.getvalue()))


def test_the_readme_keeps_its_two_set_up_commands():
    assert "pip install -r requirements.txt && python app.py" in README
    assert "pip install -r requirements-dev.txt && python -m pytest" in README
