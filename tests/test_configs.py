"""Every shipped YAML parses against the real CLI (class paths resolve, argument names and types check).

``--print_config`` makes LightningCLI parse and validate the whole config, then exit before
instantiating anything, so no model is loaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_modules.cli import CompressionCLI, EvaluationCLI

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_config_parses_and_documents_its_command(path, capsys, monkeypatch):
    text = path.read_text()
    first = text.splitlines()[0]
    match = re.match(r"#\s*(?:Run|Command):\s*(python (train|evaluate)\.py (\w+) .*)", first)
    assert match, f"{path}: first line must be '# Run: python train.py fit --config {path.relative_to(ROOT)} ...'"
    entry, subcommand = match.group(2), match.group(3)
    assert str(path.relative_to(ROOT)) in match.group(1)
    if path.parent.name == "debug":  # overlays are parsed on top of the config their command names
        configs = re.findall(r"--config (\S+)", match.group(1))
        args = [subcommand] + [a for c in configs for a in ("--config", str(ROOT / c))]
    else:
        args = [subcommand, "--config", str(path)]
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = EvaluationCLI if entry == "evaluate" else CompressionCLI
    with pytest.raises(SystemExit) as exit_info:
        cli(args=[*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path" in printed
