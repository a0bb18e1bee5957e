"""benchmarks/llm_general.py's recovery rows: the validation ratio of a train.py run is taken only when the run
validated on the DOMAIN_VALIDATION corpora with the benchmark's token count, and checked against its dense figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from data.domains import DOMAIN_TESTS, DOMAIN_VALIDATION

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def general(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmarks import their `common` as a script does
    import llm_general

    return llm_general


def _run(folder: Path, validation, val_tokens: int, dense_val: float) -> str:
    folder.mkdir()
    summary = {"test": {f"test/ppl/{d}": 2.0 * (i + 1) for i, d in enumerate(DOMAIN_TESTS)},
               "compression": {"model_params_after": 1000}, "wall_seconds": 60.0,
               "validation": {"val/ppl": 1.5 * dense_val}, "dense_validation": {"ppl": dense_val}}
    (folder / "summary.json").write_text(json.dumps(summary))
    data = {"validation": validation, "val_max_tokens": val_tokens, "seq_len": 256}
    (folder / "config.yaml").write_text(yaml.safe_dump({"data": {"init_args": data}}))
    return str(folder / "summary.json")


def test_recovered_rows_take_the_validation_ratio_only_from_the_same_windows(general, tmp_path):
    dense = {"test": {d: 1.0 * (i + 1) for i, d in enumerate(DOMAIN_TESTS)},
             "val": {d: 2.0 + i for i, d in enumerate(DOMAIN_VALIDATION)}, "params": 2000}
    gmean = math.exp(sum(math.log(v) for v in dense["val"].values()) / len(dense["val"]))
    same = _run(tmp_path / "same", list(DOMAIN_VALIDATION.values()), 1024, gmean)
    wiki = _run(tmp_path / "wiki", "wiki:val", 1024, gmean)
    rows = general.read_recovered([f"same=0.2={same}", f"wiki=0.2={wiki}"], val_tokens=1024, seq_len=256)
    assert rows["same"]["val"] == pytest.approx(1.5) and "val" not in rows["wiki"]
    assert "val" not in general.read_recovered([f"s=0.2={same}"], val_tokens=512, seq_len=256)["s"]
    args = SimpleNamespace(eval_tokens=8192, val_tokens=1024)
    row = {"row": "plain", "ratio": 0.2, "val": {d: 2 * v for d, v in dense["val"].items()}, "params": 1000,
           "calibration_s": 1.0, "gradient_s": 0.0, "decomposition_s": 1.0, "command": "python benchmarks/x.py"}
    state = {"rows": {"plain@0.2": row}, "dense": dense}
    table = general.render(state, args, rows)
    assert "| plain | 2.000 |" in table  # a benchmark row: validation only
    assert "| same | 1.500 | 2.00 | 2.00 |" in table and "| wiki | - |" in table

    other = _run(tmp_path / "other", list(DOMAIN_VALIDATION.values()), 1024, 1.01 * gmean)
    with pytest.raises(ValueError, match="not the same validation windows"):
        general.render(state, args,
                       general.read_recovered([f"other=0.2={other}"], val_tokens=1024, seq_len=256))
