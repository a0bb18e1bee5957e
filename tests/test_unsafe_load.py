"""Issue 13 item 4: no load path of the library unpickles a user's file.

Each test hands a load path a file built by :mod:`tests.malicious` (its unpickling would create a
marker file) and checks that the path raises an error naming the file and the marker never
appears; a source scan checks that every ``torch.load`` outside tests passes ``weights_only=True``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from compression.export import WEIGHTS_NAME, load_compressed
from compression.io import safe_torch_load
from compression.plan import load_plan
from tests.malicious import malicious_checkpoint, malicious_pickle

ROOT = Path(__file__).resolve().parents[1]


def test_the_malicious_files_really_run_code_when_unpickled_unsafely(tmp_path):
    import pickle

    path, marker = malicious_pickle(tmp_path / "evil.pkl")
    pickle.loads(path.read_bytes())  # the attack itself, on a file we built, to prove the payload works
    assert marker.exists()
    ckpt, ckpt_marker = malicious_checkpoint(tmp_path / "evil.ckpt")
    torch.load(ckpt, weights_only=False)  # the unsafe load issue 13 removes from the library; here on purpose
    assert ckpt_marker.exists()


def test_library_load_paths_refuse_malicious_pickles(tmp_path):
    from lightning_modules.vggt_spec import VGGTSpec, load_vggt_weights

    ckpt, marker = malicious_checkpoint(tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match=rf"refusing to load {re.escape(str(ckpt))}: .*it would call io\.open"):
        safe_torch_load(ckpt)
    with pytest.raises(ValueError, match="refusing to load"):
        safe_torch_load(ckpt, mmap=True)
    pkl, pkl_marker = malicious_pickle(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=rf"{re.escape(str(pkl))}"):
        safe_torch_load(pkl)

    # a pickle where safetensors are expected: VGGT weights and compressed exports
    weights, w_marker = malicious_pickle(tmp_path / "vggt.safetensors")
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))} is not a readable safetensors file"):
        load_vggt_weights(weights)
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        VGGTSpec(weights=str(weights)).build()
    export = tmp_path / "export"
    export.mkdir()
    exp_weights, e_marker = malicious_pickle(export / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=rf"{re.escape(str(exp_weights))} is not a readable safetensors file"):
        load_compressed(export, build=lambda: nn.Linear(2, 2))
    plan_file, p_marker = malicious_pickle(tmp_path / "compression_plan.json")
    with pytest.raises(ValueError, match=rf"{re.escape(str(plan_file))} is not"):
        load_plan(plan_file)
    assert not any(m.exists() for m in (marker, pkl_marker, w_marker, e_marker, p_marker))


def test_vggt_testbed_export_refuses_a_malicious_checkpoint(tmp_path):
    import argparse

    from benchmarks.vggt_testbed import export

    run = tmp_path / "version_0"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  spec:\n    init_args: {}\n")
    ckpt, marker = malicious_checkpoint(run / "compressed.ckpt")
    args = argparse.Namespace(ckpt=str(ckpt), out=str(tmp_path / "w.safetensors"), command="x")
    with pytest.raises(ValueError, match=rf"refusing to load {re.escape(str(ckpt))}"):
        export(args)
    assert not marker.exists() and not (tmp_path / "w.safetensors").exists()


def test_no_unsafe_torch_load_in_the_library():
    """Every ``torch.load`` outside tests passes ``weights_only=True`` (safe_torch_load's own do)."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith((".venv/", "tests/")) or "/." in f"/{rel}":
            continue
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start(): text.find(")", match.end()) + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{rel}:{text.count(chr(10), 0, match.start()) + 1}: {call}")
        if re.search(r"\bpickle\.loads?\(|\bUnpickler\(", text):
            offenders.append(f"{rel}: uses pickle directly")
    assert offenders == []
