"""Offline corpora and the TextDataModule: splits, windows, determinism, cache keys."""

from __future__ import annotations

import pytest
import torch

from data.corpora import GENRES, load_documents, mix_components, wiki_split_of
from data.text import TextDataModule, evaluation_windows, tokenizer_fingerprint


def byte_tokenizer(extra: str = ""):
    """A real byte-level tokenizer (256 byte symbols + <eos>), built in-process."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    if extra:
        vocab[extra] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture
def corpus_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    for name in ("a", "b", "c"):
        idx = torch.randint(0, len(words), (600,), generator=g).tolist()
        (tmp_path / f"{name}.txt").write_text(" ".join(words[i] for i in idx))
    return tmp_path


def make_dm(tmp_path, corpus_files, **kw):
    args = dict(tokenizer=byte_tokenizer(), calibration=f"mix:file:{corpus_files}/a.txt,file:{corpus_files}/b.txt",
                finetune=f"file:{corpus_files}/b.txt", validation=f"file:{corpus_files}/c.txt",
                test={"c": f"file:{corpus_files}/c.txt"}, seq_len=32, calibration_samples=10, eval_max_tokens=None,
                batch_size=4, cache_dir=str(tmp_path / "cache"))
    args.update(kw)
    return TextDataModule(**args)


def test_shakespeare_genres_and_play_split():
    assert set(GENRES) == {"comedies", "histories", "problems", "roman", "romances", "tragedies"}
    plays, _ = load_documents("shakespeare:tragedies")
    val, _ = load_documents("shakespeare:tragedies@val")
    test, _ = load_documents("shakespeare:tragedies@test")
    assert len(val) + len(test) == len(plays) >= 5
    assert not set(val) & set(test)
    comedies, _ = load_documents("shakespeare:comedies")
    assert not set(comedies) & set(plays)
    with pytest.raises(ValueError, match="genre"):
        load_documents("shakespeare:sonnets")


def test_wiki_splits_disjoint_and_deterministic():
    calib, fp1 = load_documents("wiki:calib")
    test, _ = load_documents("wiki:test")
    again, fp2 = load_documents("wiki:calib")
    assert calib == again and fp1 == fp2
    assert not set(calib) & set(test)
    assert 0.5 < len(calib) / (len(calib) + len(test)) < 0.75
    assert wiki_split_of("Paris") == wiki_split_of("Paris")


def test_sources_errors_say_what_to_do(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        load_documents(f"file:{tmp_path}/missing*.txt")
    with pytest.raises(ValueError, match="unknown text source 'gutenberg:all'; kinds: shakespeare:, wiki:, kjv:"):
        load_documents("gutenberg:all")
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no route to hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="needs the dataset hub.*Offline, use"):
        load_documents("hf:wikitext2")
    assert mix_components("mix:a:1, b:2") == ["a:1", "b:2"]


def test_evaluation_windows_are_non_overlapping_and_spread():
    tokens = torch.arange(1000)
    w = evaluation_windows(tokens, 100, None)
    assert w.shape == (10, 100) and torch.equal(w.flatten(), tokens)
    spread = evaluation_windows(tokens, 100, 300)
    assert spread.shape == (3, 100)
    assert spread[:, 0].tolist() == [0, 400, 900]  # windows 0, round(4.5)=4, 9: first and last kept


def test_datamodule_windows_shapes_and_determinism(tmp_path, corpus_files):
    dm = make_dm(tmp_path, corpus_files)
    dm.setup("fit")
    calib = next(iter(dm.calibration_dataloader()))
    assert calib["input_ids"].shape == (4, 32) and torch.equal(calib["labels"], calib["input_ids"])
    assert len(dm.calibration_dataloader().dataset) == 10
    tokens_c = dm.tokens(f"file:{corpus_files}/c.txt")
    assert len(dm.test_dataloader()[0].dataset) == tokens_c.numel() // 32
    assert dm.test_names == ["c"]
    again = make_dm(tmp_path, corpus_files)
    again.setup("fit")
    assert torch.equal(again._windows["calibration"], dm._windows["calibration"])
    other_seed = make_dm(tmp_path, corpus_files, seed=1)
    other_seed.setup("fit")
    assert not torch.equal(other_seed._windows["calibration"], dm._windows["calibration"])


def test_cache_keys_change_with_tokenizer_seed_count_and_length(tmp_path, corpus_files):
    def cache_files():
        return {p.name for p in (tmp_path / "cache").glob("calib-*.pt")}

    make_dm(tmp_path, corpus_files).setup("fit")
    seen = cache_files()
    assert len(seen) == 1
    make_dm(tmp_path, corpus_files).setup("fit")  # reused, not rewritten under a new name
    assert cache_files() == seen
    variants = [dict(seed=3), dict(calibration_samples=11), dict(seq_len=16), dict(tokenizer=byte_tokenizer("<x>"))]
    for i, kw in enumerate(variants, start=2):
        make_dm(tmp_path, corpus_files, **kw).setup("fit")
        assert len(cache_files()) == i, kw
    assert tokenizer_fingerprint(byte_tokenizer()) != tokenizer_fingerprint(byte_tokenizer("<x>"))
