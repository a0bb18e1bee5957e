"""Every command shown to a user parses: README.md, docs/**/*.md, the YAML headers in configs/ and the
prepared run scripts benchmarks/*.sh.

Commands are extracted from fenced code blocks and inline code spans of the markdown files
(``\\`` continuations joined, trailing ``# comments`` dropped) and from the header comments of
every YAML, where a line of bare flags (``# Ratio: --compression.ratio 0.4``) is appended to the
file's ``# Run:`` command.  Then:

- ``python train.py ...`` / ``python evaluate.py ...``: the real CLI parses them with
  ``--print_config`` (``--help`` examples run as written), in-process, nothing is instantiated;
- ``python benchmarks/<x>.py ...``: the script exists and every flag of the command is one its
  argument parser declares (read from its source and ``benchmarks/common.py``, without importing
  torch: ``--help`` of every script would cost a minute of imports);
- ``make <target>``: the Makefile has the target.

``torchrun``/``srun``/``flock`` launchers and ``.venv/bin/python`` are stripped to the command they run.
"""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from lightning_modules.cli import CompressionCLI, EvaluationCLI

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
YAMLS = sorted((ROOT / "configs").rglob("*.yaml"))
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.sh"))
FLAG = re.compile(r"""(--[A-Za-z_][\w.+]*)(?:[ =]('[^']*'|"[^"]*"|[^\s;,)`]+))?""")


def _normalize(line: str) -> str | None:
    """The command a line runs, launchers stripped; ``None`` when it runs none of ours."""
    line = line.strip().rstrip("\\").strip()
    line = re.sub(r"\s+#\s.*$", "", line)  # trailing comment (a ' # ' after the command)
    line = re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", line)  # VAR=value prefixes
    line = re.sub(r"^flock\s+\S+\s+", "", line)
    line = line.replace(".venv/bin/python", "python")
    line = re.sub(r"^step\s+\d+\s+(?=benchmarks/)", "python ", line)  # benchmarks/gpu_figures.sh's timed steps
    if line.startswith(("torchrun ", "srun ")):
        match = re.search(r"(?:python\s+)?((?:train|evaluate)\.py\s.*)$", line)
        return f"python {match.group(1)}" if match else None
    if re.match(r"python\s+(?:train\.py|evaluate\.py|benchmarks/\S+\.py)", line) or re.match(r"make\s+\w", line):
        return line
    return None


def _joined(lines: list[str]) -> list[str]:
    out, current = [], ""
    for line in lines:
        current = f"{current} {line.strip()}" if current else line
        if line.rstrip().endswith("\\"):
            current = current.rstrip().rstrip("\\")
            continue
        out.append(current)
        current = ""
    return out + ([current] if current else [])


def markdown_commands(path: Path) -> list[str]:
    text = path.read_text()
    lines: list[str] = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        lines += _joined(block.splitlines())
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += re.findall(r"`([^`\n]*(?:python|make) [^`\n]*)`", prose)
    lines += [m.strip() for m in re.findall(r"^ {4,}((?:flock|python|\.venv)\S*\s.*)$", prose, flags=re.M)]
    return [c for c in (_normalize(x) for x in lines) if c]


def yaml_commands(path: Path) -> list[str]:
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    run = _normalize(re.sub(r"^(?:Run|Command):\s*", "", header[0]))
    commands = [run] if run else []
    for line in header[1:]:
        full = re.search(r"((?:flock\s+\S+\s+)?(?:\.venv/bin/)?python\s+\S+\.py\s.*)$", line)
        if full:  # a whole command; a remark after it in parentheses or a full stop is prose
            commands.append(_normalize(re.sub(r"\s+\(.*$", "", full.group(1)).rstrip(".)")))
        elif run and "--" in line:
            flags = re.sub(r"`[^`]*`", "", line)  # `pip install --no-deps ...` and other quoted commands are not ours
            commands += [f"{run} {flag} {value.rstrip('.')}".strip() for flag, value in FLAG.findall(flags)]
    return [c for c in commands if c]


def all_commands() -> list[tuple[str, str]]:
    found = [(str(p.relative_to(ROOT)), c) for p in MARKDOWN for c in markdown_commands(p)]
    found += [(str(p.relative_to(ROOT)), c) for p in YAMLS for c in yaml_commands(p)]
    found += [(str(p.relative_to(ROOT)), c) for p in SCRIPTS for line in _joined(p.read_text().splitlines())
              if not line.lstrip().startswith("#") and (c := _normalize(line))]
    seen, unique = set(), []
    for source, command in found:
        if command not in seen:
            seen.add(command)
            unique.append((source, command))
    return unique


COMMANDS = all_commands()


def test_the_extraction_finds_the_documented_commands():
    commands = {c for _, c in COMMANDS}
    assert "make demo" in commands and "make test" in commands
    assert "python train.py fit --config configs/llm/asvd.yaml --compression.ratio 0.4" in commands
    assert any(c.startswith("python evaluate.py test --config configs/llm/svd_llm.yaml --ckpt_path") for c in commands)
    assert any(c.startswith("python benchmarks/qsvd_llm.py") for c in commands)
    assert any(s == "benchmarks/gpu_figures.sh" and "--model llama-1b" in c for s, c in COMMANDS)
    assert sum(c.startswith("python train.py") for c in commands) > 60
    assert not [c for c in commands if "callbacks." in c and ".help" not in c], "list-position flags are gone"


@cache
def _declared_flags(script: str) -> set[str]:
    """Flags a benchmark's parser declares: its own ``add_argument("--x"`` calls, plus the shared
    LLM parser's when it uses ``lm_parser``, plus subcommand names."""
    source = (ROOT / script).read_text()
    if "lm_parser" in source:
        source += (ROOT / "benchmarks" / "common.py").read_text()
    flags = set(re.findall(r"""add_argument\(\s*["'](--[\w-]+)["']""", source))
    return flags | set(re.findall(r"""add_parser\(\s*["'](\w+)["']""", source))


@pytest.mark.parametrize("source, command", COMMANDS, ids=[f"{s}: {c[:90]}" for s, c in COMMANDS])
def test_documented_command_parses(source, command, monkeypatch, capsys):
    argv = shlex.split(command)
    monkeypatch.chdir(ROOT)
    if argv[0] == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert argv[1] in targets, f"{source}: Makefile has no target {argv[1]!r}"
        return
    script, args = argv[1], argv[2:]
    for i, arg in enumerate(args):  # a template like configs/vlm/<name>.yaml: the first file it stands for
        if re.search(r"<\w+>", arg) and "/" in arg:
            matches = sorted(ROOT.glob(re.sub(r"<\w+>", "*", arg)))
            assert matches, f"{source}: no file matches {arg}"
            args[i] = str(matches[0].relative_to(ROOT))
    assert (ROOT / script).is_file(), f"{source}: {script} does not exist"
    if script.startswith("benchmarks/"):
        declared = _declared_flags(script)
        for flag in [a.split("=")[0] for a in args if a.startswith("--")]:
            assert flag in declared, f"{source}: {script} has no flag {flag}"
        return
    cli = EvaluationCLI if script == "evaluate.py" else CompressionCLI
    monkeypatch.setattr("sys.argv", [script])
    asks_help = any(a == "--help" or a.endswith(".help") for a in args)
    with pytest.raises(SystemExit) as exit_info:
        cli(args=args if asks_help else [*args, "--print_config"])
    assert exit_info.value.code in (0, None), f"{source}: `{command}` did not parse:\n{capsys.readouterr().err[-3000:]}"
