"""The benchmarks' line about GPU figures: measured on which GPU, or not measured and why (CPU figures only)."""

from __future__ import annotations

import torch

from benchmarks.common import gpu_note


def test_gpu_note_says_when_gpu_figures_were_not_measured(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_note("cpu") == "no CUDA device: GPU figures not measured, CPU figures only"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_note("cpu").startswith("CUDA device present but this run measured the CPU: GPU figures not measured")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"Fake GPU ({device})")
    assert gpu_note("cuda:0") == "GPU figures measured on Fake GPU (cuda:0)"


def test_cuda_without_a_device_is_refused_up_front(monkeypatch, capsys):
    import argparse

    import pytest

    from benchmarks.common import require_device

    parser = argparse.ArgumentParser(prog="bench")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        require_device(parser, "cuda:0")
    assert exit_info.value.code == 2
    assert "--device cuda:0: no CUDA device here (leave --device out" in capsys.readouterr().err
    require_device(parser, "cpu")  # nothing to refuse
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    require_device(parser, "cuda")
