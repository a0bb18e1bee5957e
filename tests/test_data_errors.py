"""Bad data and bad data configs get one clear message naming the file or field (issue 13 item 5):
unparseable JSON / JSONL, garbage token caches (rebuilt), a tokenizer the model cannot embed,
multi-view view counts, and config errors found before any model loads -- through the real CLI."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from data.cache import cached_tensor, token_check
from data.jsonfiles import DataFileError, iter_jsonl, load_json
from data.text import TextDataModule
from data.vocab import check_vocabulary
from models.causal_lm import build_byte_tokenizer
from tests.conftest import make_tiny_llama


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SVD_VGGT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
    words = ["alpha", "beta", "gamma", "delta"]
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text(" ".join(words[(i * 7 + ord(name)) % 4] for i in range(300)))
    return tmp_path


def text_dm(tmp_path, corpus, **kw):
    args = dict(tokenizer=build_byte_tokenizer(), calibration=f"file:{corpus}/a.txt", finetune=f"file:{corpus}/b.txt",
                validation=f"file:{corpus}/c.txt", test={"c": f"file:{corpus}/c.txt"}, seq_len=32,
                calibration_samples=4, finetune_samples=4, eval_max_tokens=None, cache_dir=str(tmp_path / "tokens"))
    args.update(kw)
    return TextDataModule(**args)


# -- JSON / JSONL ---------------------------------------------------------------------------------------
def test_json_errors_name_the_file_line_and_column(tmp_path):
    bad = tmp_path / "a.json"
    bad.write_text('{\n  "x": 1,\n  "y": [1, 2,\n}\n')
    with pytest.raises(DataFileError, match=rf"^{bad}:4:1: not valid JSON"):
        load_json(bad)
    lines = tmp_path / "a.jsonl"
    lines.write_bytes(b'{"a": 1}\n\n{"a": 2}\n{"a": \n')
    with pytest.raises(DataFileError, match=rf"^{lines}:4:\d+: not valid JSONL"):
        list(iter_jsonl(lines))
    reader = iter_jsonl(lines)
    assert [next(reader), next(reader)] == [(1, {"a": 1}), (3, {"a": 2})]  # blank lines skipped, numbering kept
    lines.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(DataFileError, match=rf"^{lines}:2: not UTF-8"):
        list(iter_jsonl(lines))


def test_alpaca_files_are_refused_with_file_and_line(tmp_path):
    from data.instruct import InstructionDataModule, read_alpaca

    good = {"instruction": "Add", "input": "1 1", "output": "2"}
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([json.dumps(good), json.dumps(good), '{"instruction": "x", "output": '])
                    + "\n")
    with pytest.raises(DataFileError, match=rf"{path}:3:\d+: not valid alpaca JSONL"):
        read_alpaca(path)
    path.write_text("\n".join([json.dumps(good), json.dumps({"instruction": "x", "output": 3})]))
    with pytest.raises(DataFileError, match=rf"{path}:2: an alpaca record needs 'instruction' and 'output' strings"):
        read_alpaca(path)
    listing = tmp_path / "train.json"
    listing.write_text(json.dumps([good, ["not", "a", "record"]]))
    with pytest.raises(DataFileError, match=rf"{listing} record 1: expected an object"):
        read_alpaca(listing)
    listing.write_text(json.dumps([good]))
    assert read_alpaca(listing) == [good]
    with pytest.raises(FileNotFoundError, match="train_path='/nonexistent/a.json' is not a file"):
        InstructionDataModule("/nonexistent/a.json", tokenizer=build_byte_tokenizer())


def test_vqa_annotation_files_are_refused_with_file_and_line(tmp_path):
    from data.vqa.datamodule import VQADataModule
    from data.vqa.scienceqa import read_scienceqa
    from data.vqa.vizwiz import read_vizwiz

    (tmp_path / "annotations").mkdir()
    bad = tmp_path / "annotations" / "val.json"
    bad.write_text('[{"image": "a.jpg", "question": "what?"},\n {"image": "b.jpg" "question": "who?"}]')
    with pytest.raises(DataFileError, match=rf"{bad}:2:\d+: not valid VizWiz annotations JSON"):
        read_vizwiz(tmp_path, "val")
    (tmp_path / "problems.json").write_text('{"1": {"question": "q"}')
    (tmp_path / "pid_splits.json").write_text('{"test": ["1"]}')
    with pytest.raises(DataFileError, match=rf"{tmp_path / 'problems.json'}:1:\d+: not valid ScienceQA"):
        read_scienceqa(tmp_path, "test")
    (tmp_path / "problems.json").write_text('[1, 2]')
    with pytest.raises(DataFileError, match="expected a JSON object"):
        read_scienceqa(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="root='/nonexistent/sqa' is not a folder"):
        VQADataModule("scienceqa", root="/nonexistent/sqa")


# -- token caches -----------------------------------------------------------------------------------------
def test_garbage_token_cache_files_are_named_and_rebuilt(tmp_path, corpus, caplog):
    dm = text_dm(tmp_path, corpus)
    clean = dm.tokens(f"file:{corpus}/a.txt").clone()
    calib = dm.calibration_windows().clone()
    stream = sorted((tmp_path / "tokens").glob("tokens-*.pt"))[0]
    (window_file,) = (tmp_path / "tokens").glob("calib-*.pt")
    garbage = {
        "text": b"definitely not a tensor file\n",
        "empty": b"",
        "half": stream.read_bytes()[: stream.stat().st_size // 2],
    }
    for blob in garbage.values():
        for path in (tmp_path / "tokens").glob("tokens-*.pt"):
            path.write_bytes(blob)
        window_file.write_bytes(blob)
        caplog.clear()
        fresh = text_dm(tmp_path, corpus)
        with caplog.at_level(logging.WARNING, logger="data.cache"):
            assert torch.equal(fresh.tokens(f"file:{corpus}/a.txt"), clean)
            assert torch.equal(fresh.calibration_windows(), calib)
        named = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
        assert any(str(window_file) in m for m in named) and len(named) >= 2, named
    # loadable, but not what the key promises: wrong dtype, shape or ids outside the vocabulary
    for bad in (calib.float(), calib[:, :5], calib + 1000):
        torch.save(bad, window_file)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="data.cache"):
            assert torch.equal(text_dm(tmp_path, corpus).calibration_windows(), calib)
        assert any(str(window_file) in r.getMessage() for r in caplog.records)


def test_token_check_says_what_is_wrong(tmp_path):
    check = token_check(10, shape=(2, 3))
    check(torch.zeros(2, 3, dtype=torch.long))
    for value, message in [({"a": 1}, "dict, not a tensor"), (torch.zeros(2, 3), "float32 tensor, not token ids"),
                           (torch.zeros(3, 2, dtype=torch.long), r"shape \(3, 2\), expected \(2, 3\)"),
                           (torch.full((2, 3), 10), r"ids in \[10, 10\], outside .* \[0, 10\)")]:
        with pytest.raises(ValueError, match=message):
            check(value)
    with pytest.raises(ValueError, match="outside"):  # a fresh build that fails is a bug, never written
        cached_tensor(tmp_path / "x.pt", lambda: torch.full((2, 3), 99), check)
    assert not (tmp_path / "x.pt").exists()


# -- vocabulary -------------------------------------------------------------------------------------------
def test_tokenizer_model_vocabulary_mismatch_is_refused_naming_both(tmp_path, corpus):
    tok = build_byte_tokenizer()  # 257 tokens
    small = make_tiny_llama()  # 128 embedding rows
    with pytest.raises(ValueError, match=r"tokenizer \w+ has 257 tokens but model "
                                         r"LlamaForCausalLM has input embedding 128 rows and output embedding 128"):
        check_vocabulary(tok, small)
    small.resize_token_embeddings(300)
    check_vocabulary(tok, small)  # more rows than tokens: fine (padded vocabularies)
    with pytest.raises(ValueError, match="token id 300 .* LlamaForCausalLM has input embedding 300 rows"):
        check_vocabulary(tok, small, torch.tensor([[-100, 5], [300, 2]]))
    check_vocabulary(tok, small, torch.tensor([-100, 299]))  # -100 label padding is not an id

    dm = text_dm(tmp_path, corpus)
    dm.setup("fit")
    dm.check_model(small)
    with pytest.raises(ValueError, match="has 257 tokens but model"):
        dm.check_model(make_tiny_llama())


# -- early config checks ------------------------------------------------------------------------------------
def test_text_sources_and_lengths_are_checked_at_construction(tmp_path, corpus, monkeypatch):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    cases = [(dict(calibration="mix:wiki:calib,shakespeare:sonnets"), "calibration: unknown Shakespeare genre"),
             (dict(test={"x": "kjv:train"}), r"test\['x'\]: bad source 'kjv:train'"),
             (dict(validation=f"file:{tiny}"), rf"validation: 'file:{tiny}' has at most 13 tokens, fewer than one "
                                               "window of seq_len=32"),
             (dict(finetune=f"mix:file:{tiny},file:{tiny}"), "finetune: .* at most 26 tokens")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            text_dm(tmp_path, corpus, **kwargs)
    text_dm(tmp_path, corpus, finetune=f"mix:file:{tiny},file:{corpus}/a.txt")  # together long enough: fine

    # a tokenizer with merges can make fewer tokens than the bytes bound: caught after tokenizing
    def fewer(self, documents):
        return torch.zeros(20, dtype=torch.int32)

    monkeypatch.setattr(TextDataModule, "_tokenize", fewer)
    dm = text_dm(tmp_path, corpus, cache_dir=str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"calibration: 'file:.*a.txt' has 20 tokens, fewer than one window"):
        dm.setup("fit")
    with pytest.raises(ValueError, match=r"test\['c'\]: .* has 20 tokens"):
        dm.setup("test")


def test_view_counts_are_refused_naming_the_field(tmp_path):
    from data.multiview import MultiViewDataModule
    from data.multiview.synthetic import SyntheticMultiViewDataset

    for views in (1, 0, 2.5):
        with pytest.raises(ValueError, match=rf"num_views must be an integer >= 2 .* got {views}"):
            MultiViewDataModule(num_views=views, image_size=(28, 28))
    with pytest.raises(ValueError, match="num_views must be an integer >= 2"):
        SyntheticMultiViewDataset(2, num_views=1, image_size=(28, 28))
    with pytest.raises(FileNotFoundError, match="root='/nonexistent/co3d' is not a folder"):
        MultiViewDataModule(source="co3d", root="/nonexistent/co3d")
    assert MultiViewDataModule(num_views=2, image_size=(28, 28)).num_views == 2


# -- through the CLI: data config errors surface before the model is built ------------------------------------
def _cli(tmp_path, model: dict, data: dict) -> None:
    import sys

    from lightning_modules.cli import CompressionCLI

    config = {"trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 0, "logger": False,
                          "enable_checkpointing": False, "enable_progress_bar": False, "num_sanity_val_steps": 0,
                          "default_root_dir": str(tmp_path / "run")},
              "model": {"spec": model}, "data": data, "test_after_fit": False, "save_compressed": False}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    argv, sys.argv = sys.argv, ["train.py"]  # pytest's own arguments are not the CLI's
    try:
        CompressionCLI(args=["fit", "--config", str(path)])
    finally:
        sys.argv = argv


def test_cli_reports_data_errors_before_building_the_model(tmp_path, corpus, monkeypatch):
    import models.causal_lm as causal_lm

    folder = tmp_path / "tokenizer-only"  # a tokenizer and a config, no weights: the model cannot load
    build_byte_tokenizer().save_pretrained(folder)
    make_tiny_llama().config.save_pretrained(folder)
    built = []
    real = causal_lm.load_causal_lm
    monkeypatch.setattr(causal_lm, "load_causal_lm", lambda *a, **k: built.append(a) or real(*a, **k))
    model = {"class_path": "lightning_modules.CausalLMSpec", "init_args": {"name_or_path": str(folder)}}
    data = {"class_path": "data.text.TextDataModule",
            "init_args": {"tokenizer": str(folder), "calibration": f"file:{corpus}/a.txt",
                          "finetune": f"file:{corpus}/b.txt", "validation": f"file:{corpus}/c.txt",
                          "test": {"c": f"file:{corpus}/c.txt"}, "seq_len": 32, "calibration_samples": 2,
                          "cache_dir": str(tmp_path / "tokens"), "eval_max_tokens": None}}
    with pytest.raises(Exception) as control:  # with valid data, fit gets as far as building the model
        _cli(tmp_path, model, data)
    assert built and str(folder) in str(control.value), control.value

    built.clear()
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    for change, message in [({"calibration": "shakespeare:sonnets"}, "calibration: unknown Shakespeare genre"),
                            ({"validation": f"file:{short}"}, "validation: .* fewer than one window"),
                            ({"test": {"x": "books:all"}}, r"test\['x'\]: unknown text source 'books:all'")]:
        bad = {**data, "init_args": {**data["init_args"], **change}}
        with pytest.raises(ValueError, match=message):
            _cli(tmp_path, model, bad)
    assert not built  # the model was never loaded

    vggt = {"class_path": "lightning_modules.VGGTSpec", "init_args": {"weights": str(tmp_path / "missing.safetensors")}}
    views = {"class_path": "data.multiview.MultiViewDataModule",
             "init_args": {"num_views": 1, "image_size": [28, 28], "train_scenes": 1, "val_scenes": 1}}
    with pytest.raises(ValueError, match="num_views must be an integer >= 2"):
        _cli(tmp_path, vggt, views)
    views["init_args"]["num_views"] = 2
    with pytest.raises(FileNotFoundError, match="VGGT weights .*missing.safetensors not found"):
        _cli(tmp_path, vggt, views)  # the control: built, this model fails to load
