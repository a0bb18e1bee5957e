"""benchmarks/llm_fidelity.py: KL(dense || compressed) and top-1 agreement, and the checkpoint round trip."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from compression import Recipe, collect_stats, compress_

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fid(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmarks import their `common` as a script does
    import llm_fidelity

    return llm_fidelity


def test_fidelity_is_the_mean_token_kl_and_argmax_agreement(fid, tiny_llama):
    windows = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    other = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        other.model.norm.weight.mul_(30.0)  # sharper logits: a clearly different distribution
    got = fid.fidelity(tiny_llama, {"same": copy.deepcopy(tiny_llama), "other": other}, windows, batch=4)
    assert got["same"]["kl"] == pytest.approx(0.0, abs=1e-6) and got["same"]["top1"] == 1.0
    with torch.no_grad():
        p = torch.log_softmax(tiny_llama(input_ids=windows).logits, -1)
        q = torch.log_softmax(other(input_ids=windows).logits, -1)
    kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    assert got["other"]["kl"] == pytest.approx(kl.mean().item(), rel=1e-5) and got["other"]["kl"] > 1e-2
    assert got["other"]["top1"] == pytest.approx((p.argmax(-1) == q.argmax(-1)).float().mean().item())


def test_student_is_rebuilt_from_a_checkpoint_without_unpickling(fid, tiny_llama, tmp_path):
    from lightning_modules.module import PLAN_KEY

    compressed = copy.deepcopy(tiny_llama)
    batches = [{"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    targets = [n for n, m in compressed.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    stats = collect_stats(compressed, targets, batches)
    report = compress_(compressed, Recipe("svd", ratio=0.4, targets=targets), stats)
    path = tmp_path / "compressed.ckpt"
    torch.save({PLAN_KEY: report.plan, "state_dict": {f"model.{k}": v for k, v in compressed.state_dict().items()}},
               path)
    student = fid.load_student(tiny_llama, str(path))
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, compressed(input_ids=ids).logits)
        assert not torch.equal(student(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(SystemExit, match="no compression plan in it"):
        fid.load_student(tiny_llama, str(tmp_path / "plain.ckpt"))
