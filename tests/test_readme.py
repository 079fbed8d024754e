"""The README's Python examples run as written, and CI runs the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace = {}                                      # later blocks continue earlier ones
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "readme.pt").is_file()
    assert (tmp_path / "runs" / "readme.ivfpq").is_file()


def test_ci_runs_the_readme_test_command():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in ci_lines if line and not line.startswith(("#", "set ", "cd "))]
    assert any(cmd in README for cmd in commands)


def _readme_cli_commands() -> list[list[str]]:
    """Every ``qinco2 task=...`` command of the README's bash blocks, as its argument list."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = line.split()
            if not any(w.startswith("task=") for w in words):
                continue
            if words[0] == "scripts/launch.sh":                 # scripts/launch.sh -n N task=...
                commands.append(words[3:])
            else:                                               # [setup && ] qinco2 task=...
                commands.append(words[words.index("qinco2") + 1:])
    return commands


def test_readme_cli_commands_parse():
    """Each README command names a task and keys that the CLI knows, with valid values."""
    from qinco2.cli.config import parse_args
    from qinco2.cli.main import TASKS

    commands = _readme_cli_commands()
    assert len(commands) >= 15, commands
    for argv in commands:
        args, _ = parse_args(argv)
        assert args.task in TASKS, argv
