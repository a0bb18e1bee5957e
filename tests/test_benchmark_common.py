"""benchmarks/common.py: the OpenMP wait policy (the timing scripts keep the runtime's own), notes kept on rerun."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

from benchmarks.common import omp_note, write_keeping_notes

ROOT = Path(__file__).resolve().parents[1]
TIMING_SCRIPTS = ("llm_efficiency.py", "latent_cache_speed.py")


def run_common(monkeypatch, opt_out: str | None) -> str | None:
    """Execute benchmarks/common.py afresh with no OMP_WAIT_POLICY set; the policy it leaves."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    if opt_out is None:
        monkeypatch.delenv("SVD_VGGT_OMP_WAIT", raising=False)
    else:
        monkeypatch.setenv("SVD_VGGT_OMP_WAIT", opt_out)
    exec_common(monkeypatch)
    return os.environ.get("OMP_WAIT_POLICY")


def exec_common(monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("common_fresh", ROOT / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "common_fresh", module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)


def test_common_sets_passive_waiting_unless_a_timing_script_opts_out(monkeypatch):
    assert run_common(monkeypatch, None) == "PASSIVE"
    assert run_common(monkeypatch, "default") is None
    assert run_common(monkeypatch, "something else") == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the caller's own choice is kept either way
    exec_common(monkeypatch)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.parametrize("script", TIMING_SCRIPTS)
def test_timing_scripts_opt_out_before_common_and_torch_load(script):
    lines = (ROOT / "benchmarks" / script).read_text().splitlines()
    opt_out = lines.index('os.environ.setdefault("SVD_VGGT_OMP_WAIT", "default")  # time what a user\'s process gets '
                          '(see benchmarks/common.py)')
    first_import = min(i for i, line in enumerate(lines) if re.match(r"import (common|torch)\b", line))
    assert opt_out < first_import


def test_omp_note_names_the_policy(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert omp_note() == "OpenMP wait policy: the runtime's default (OMP_WAIT_POLICY unset)"
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert omp_note().startswith("OMP_WAIT_POLICY=PASSIVE: threads sleep between parallel regions")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert omp_note() == "OMP_WAIT_POLICY=ACTIVE"


def test_regenerated_results_keep_the_notes_written_after_a_run(tmp_path):
    out = tmp_path / "deep" / "results.md"
    write_keeping_notes(out, "# Table\n\n| a |\n")
    assert out.read_text() == "# Table\n\n| a |\n"
    out.write_text(out.read_text() + "\n## Reading\n\n- a note\n")
    write_keeping_notes(out, "# Table\n\n| b |\n")
    assert out.read_text() == "# Table\n\n| b |\n\n## Reading\n\n- a note\n"
    write_keeping_notes(out, "# Table\n\n| c |\n", headings=("## Other",))  # no such heading: nothing kept
    assert out.read_text() == "# Table\n\n| c |\n"
    # "## Notes" is kept too, from the first note heading on
    out.write_text("# Table\n\n| c |\n\n## Notes (by hand)\n\n- n\n\n## Reading\n\n- r\n")
    write_keeping_notes(out, "# Table\n\n| d |\n")
    assert out.read_text() == "# Table\n\n| d |\n\n## Notes (by hand)\n\n- n\n\n## Reading\n\n- r\n"


def test_benchmarks_whose_results_carry_notes_keep_them_on_a_rerun():
    """Every results file with hand-written notes under its tables is written by a benchmark that keeps them: a
    plain ``write_text`` of the regenerated tables would erase the notes the file says a rerun keeps."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for script in sorted((root / "benchmarks").glob("*.py")):
        src = script.read_text()
        plain = [line.strip() for line in src.splitlines() if "args.out.write_text(" in line and "json" not in line]
        assert not plain, (script.name, plain)
