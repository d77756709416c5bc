"""Repository contracts: CI runs the README's test command; tools and examples import the package only."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick, flags=re.S)


def test_ci_runs_the_readme_test_command():
    commands = _readme_commands()
    assert len(commands) == 2, "the Quick start must give exactly two commands: the main job and the tests"
    test_cmd = commands[1].strip()
    assert "pytest" in test_cmd
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines, f".ci/run must run the README test command: {test_cmd}"


def test_package_never_imports_tools_or_examples():
    for path in (ROOT / "megatron_vgpo").rglob("*.py"):
        src = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+(tools|examples|checkpoint_conversion)\b", src, re.M), path
