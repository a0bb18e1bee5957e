"""Inference layout (shared down GEMMs, factor layouts, merge-back): exact against the unfused model."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from compression import LowRankLinear, Recipe, apply_plan, compress_
from compression.fused import (
    FastLowRankLinear,
    SharedDown,
    compile_forward_,
    optimize_for_inference_,
    padded_widths,
)
from compression.gemm_timing import GemmTimer
from models.causal_lm import cache_keyword
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


class FixedTimer:
    """A deterministic stand-in for :class:`GemmTimer`: seconds = FLOPs, dense shapes in ``slow_factored``
    made 10x cheaper (so those layers are merged back), a layout preference by name."""

    def __init__(self, prefer: str = "transposed", cheap_dense: set[tuple[int, int]] = frozenset()):
        self.prefer, self.cheap_dense, self.measured = prefer, cheap_dense, 0

    def seconds(self, out_f, in_f, tokens, layout="rowmajor", dtype=None, device=None):
        base = float(out_f * in_f * tokens) * (0.1 if (out_f, in_f) in self.cheap_dense else 1.0)
        return base * (1.0 if layout == self.prefer else 1.5)

    def save(self):
        pass


class AlignedTimer(FixedTimer):
    """:class:`FixedTimer` where a product whose output width is not a multiple of 16 costs ``penalty`` x its FLOPs
    (as MKL's thin GEMMs did here for widths off a multiple of 8)."""

    def __init__(self, penalty: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.penalty = penalty

    def seconds(self, out_f, in_f, tokens, layout="rowmajor", dtype=None, device=None):
        return super().seconds(out_f, in_f, tokens, layout) * (1.0 if out_f % 16 == 0 else self.penalty)


@pytest.fixture
def compressed():
    model = make_tiny_llama().double()
    report = compress_(model, Recipe("svd", ratio=0.4))
    return model, report.plan


def tokens(batch=2, length=12, seed=3):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("layout", ["transposed", "rowmajor"])
def test_shared_downs_are_exact(compressed, layout):
    model, _ = compressed
    ref = copy.deepcopy(model)
    ids = tokens()
    report = optimize_for_inference_(model, batch_tokens=1, example={"input_ids": ids}, merge="never",
                                     timer=FixedTimer(prefer=layout))
    # q/k/v share one down GEMM, gate/up another; o_proj and down_proj stay on their own
    assert sorted(map(tuple, report.groups)) == sorted(
        tuple(f"model.layers.{i}.{p}" for p in ps)
        for i in range(2) for ps in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                     ("mlp.gate_proj", "mlp.up_proj")))
    fast = {n: m for n, m in model.named_modules() if isinstance(m, FastLowRankLinear)}
    assert len(fast) == 14
    assert sorted(n for n, m in fast.items() if m.shared is None) == sorted(
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj"))
    q = model.model.layers[0].self_attn.q_proj
    assert q.down.weight.is_contiguous() == (layout == "rowmajor")
    assert q.up.weight.is_contiguous() == (layout == "rowmajor")
    with torch.no_grad():
        for ids_ in (ids, tokens(1, 7, seed=5)):
            assert rel_err(model(input_ids=ids_).logits, ref(input_ids=ids_).logits) <= 1e-10


def test_shared_product_is_released_after_its_last_reader(compressed):
    """No stacked product outlives a forward (one per group would hold ``tokens x R'`` numbers until the next
    call); a member reading again after the release recomputes the same product."""
    model, _ = compressed
    ref = copy.deepcopy(model)
    optimize_for_inference_(model, example={"input_ids": tokens()}, merge="never", timer=FixedTimer())
    shared = {id(m.shared): m.shared for m in model.modules() if isinstance(m, FastLowRankLinear) and m.shared}
    assert sorted(s.uses for s in shared.values()) == [2, 2, 3, 3]  # gate/up and q/k/v of two blocks
    with torch.no_grad():
        assert rel_err(model(input_ids=tokens()).logits, ref(input_ids=tokens()).logits) <= 1e-10
        assert all(not s.memo.held for s in shared.values())
        attn, ref_attn = model.model.layers[0].self_attn, ref.model.layers[0].self_attn
        x = torch.randn(1, 3, attn.q_proj.in_features, dtype=torch.float64)
        stacked, held = attn.q_proj.shared, []
        for name in ("q_proj", "k_proj", "q_proj", "v_proj"):  # q twice: after 3 reads the product is let go
            assert rel_err(getattr(attn, name)(x), getattr(ref_attn, name)(x)) <= 1e-12, name
            held.append(stacked.memo.held)
        assert held == [True, True, False, True]  # v finds no product and computes it afresh (then holds it)
    with pytest.raises(ValueError, match="at least one reader"):
        SharedDown(stacked.weight, uses=0)


def test_greedy_decode_with_kv_cache_is_exact(compressed):
    model, _ = compressed
    ref = copy.deepcopy(model)
    optimize_for_inference_(model, example={"input_ids": tokens()}, merge="never", timer=FixedTimer())
    prompt = tokens(1, 5)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        want = ref.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0,
                            output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want.sequences)
    for a, b in zip(out.logits, want.logits):
        assert rel_err(a, b) <= 1e-10


def test_state_dict_is_unchanged_and_loads_through(compressed):
    model, _ = compressed
    ref = copy.deepcopy(model)
    before = ref.state_dict()
    optimize_for_inference_(model, example={"input_ids": tokens()}, merge="never", timer=FixedTimer())
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) and after[k].is_contiguous() for k in before)
    # new factor values written into the laid-out model land in the shared storage
    perturbed = {k: v + 0.01 * torch.randn_like(v) if "down" in k or "up" in k else v for k, v in before.items()}
    model.load_state_dict(perturbed, strict=True)
    ref.load_state_dict(perturbed, strict=True)
    ids = tokens()
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, ref(input_ids=ids).logits) <= 1e-10
    assert not any(p.requires_grad for m in model.modules() if isinstance(m, FastLowRankLinear)
                   for p in m.parameters())
    model.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no gradients"):
        model(input_ids=ids)  # training through the shared downs would leave them untrained: refused
    model.to(torch.float64)  # a conversion that changes nothing is fine
    with pytest.raises(RuntimeError, match="move/cast the model first"):
        model.float()


def test_merge_back_is_exact_and_recorded_in_the_plan(compressed):
    model, plan = compressed
    ref = copy.deepcopy(model)
    down_shape = (64, 96)  # mlp.down_proj (and nothing else in the tiny LLaMA) is 64 x 96
    report = optimize_for_inference_(model, example={"input_ids": tokens()}, plan=plan,
                                     timer=FixedTimer(cheap_dense={down_shape}))
    merged = sorted(report.merged)
    assert merged == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in merged)
    ids = tokens()
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, ref(input_ids=ids).logits) <= 1e-10
    assert not set(merged) & set(report.plan["layers"]) and report.plan["inference"]["merged"] == merged
    assert len(report.plan["layers"]) == len(plan["layers"]) - 2
    # the recorded plan rebuilds a model that loads the optimized model's state dict strictly
    fresh = make_tiny_llama().double()
    apply_plan(fresh, report.plan)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(fresh(input_ids=ids).logits, ref(input_ids=ids).logits) <= 1e-10
    assert sum(isinstance(m, LowRankLinear) for m in fresh.modules()) == 12


def test_refuses_bad_arguments(compressed):
    model, _ = compressed
    with pytest.raises(ValueError, match="merge"):
        optimize_for_inference_(model, merge="sometimes", timer=FixedTimer())
    with pytest.raises(ValueError, match="layout"):
        optimize_for_inference_(model, layout="diagonal", timer=FixedTimer())
    with pytest.raises(ValueError, match="no LowRankLinear"):
        optimize_for_inference_(make_tiny_llama(), timer=FixedTimer())
    with pytest.raises(ValueError, match="pad must be"):
        optimize_for_inference_(model, pad="always", timer=FixedTimer())
    with pytest.raises(ValueError, match="pad_margin"):
        optimize_for_inference_(model, pad_margin=1.0, timer=FixedTimer())


def test_padded_widths_round_up_to_each_multiple():
    assert padded_widths(115) == [115, 120, 128]
    assert padded_widths(229) == [229, 232, 240, 256]
    assert padded_widths(167) == [167, 168, 176, 192]
    assert padded_widths(64) == [64]
    assert padded_widths(1) == [1, 8, 16, 32]
    assert padded_widths(50, (3,)) == [50, 51]
    with pytest.raises(ValueError, match="at least one row"):
        padded_widths(0)


def test_padded_down_gemms_are_exact_and_keep_the_state_dict(compressed):
    """Tiny LLaMA at 0.4: ranks q 19, k/v 12, o 19, gate/up/down 23.  Widths off a multiple of 16 timed 2x slower:
    the q/k/v stack 43 -> 48 rows, gate/up 46 -> 48, o_proj 19 -> 32 (24 is off 16), down_proj 23 -> 32."""
    model, _ = compressed
    ref = copy.deepcopy(model)
    before = ref.state_dict()
    report = optimize_for_inference_(model, example={"input_ids": tokens()}, merge="never", timer=AlignedTimer())
    want = {}
    for i in range(2):
        pre = f"model.layers.{i}."
        want |= {pre + "self_attn.q_proj": (43, 48), pre + "self_attn.o_proj": (19, 32),
                 pre + "mlp.gate_proj": (46, 48), pre + "mlp.down_proj": (23, 32)}
    assert report.padding == want
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert attn.q_proj.shared is attn.k_proj.shared is attn.v_proj.shared
    for layer, rows, width in ((attn.q_proj, 43, 48), (attn.o_proj, 19, 32), (mlp.down_proj, 23, 32)):
        stored = layer.shared.weight
        assert stored.shape == (width, layer.in_features)
        assert torch.count_nonzero(stored[rows:]) == 0 and torch.count_nonzero(stored[:rows]) == rows * stored.shape[1]
    assert report.layers["model.layers.1.mlp.down_proj"]["width"] == 32
    ids = tokens()
    with torch.no_grad():
        for ids_ in (ids, tokens(1, 7, seed=5)):
            assert rel_err(model(input_ids=ids_).logits, ref(input_ids=ids_).logits) <= 1e-10
        prompt = tokens(1, 5)
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out, ref.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))
    after = model.state_dict()  # the padding is layout only: same keys, shapes and values
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    perturbed = {k: v + 0.01 * torch.randn_like(v) if "down" in k or "up" in k else v for k, v in before.items()}
    model.load_state_dict(perturbed, strict=True)
    ref.load_state_dict(perturbed, strict=True)
    assert torch.count_nonzero(mlp.down_proj.shared.weight[23:]) == 0  # loading writes the real rows only
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, ref(input_ids=ids).logits) <= 1e-10


@pytest.mark.parametrize(("penalty", "margin", "padded"), [(1.1, 0.03, 2), (1.06, 0.03, 0), (1.06, 0.0, 2),
                                                           (2.0, 0.03, 8)])
def test_padding_only_when_measured_faster_by_the_margin(compressed, penalty, margin, padded):
    """With a penalty p on widths off a multiple of 16, gate/up's 46-row stack costs 46 p against 48 rows padded:
    p = 1.1 saves 5.1% (> the 3% margin: padded, in both layers), p = 1.06 saves 1.7% (padded only with no
    margin); q/k/v (43 p vs 48), o_proj (19 p vs 32) and down_proj (23 p vs 32) pay only at p = 2."""
    model, _ = compressed
    ref = copy.deepcopy(model)
    report = optimize_for_inference_(model, example={"input_ids": tokens()}, merge="never",
                                     timer=AlignedTimer(penalty=penalty), pad_margin=margin)
    assert len(report.padding) == padded
    with torch.no_grad():
        assert rel_err(model(input_ids=tokens()).logits, ref(input_ids=tokens()).logits) <= 1e-10
    none = copy.deepcopy(ref)
    assert optimize_for_inference_(none, example={"input_ids": tokens()}, merge="never",
                                   timer=AlignedTimer(penalty=penalty), pad="never").padding == {}


def test_gemm_timer_caches_per_shape_on_disk(tmp_path):
    path = tmp_path / "timings.json"
    timer = GemmTimer(path, repeats=1, min_seconds=1e-4, stream_bytes=1)
    a = timer.seconds(8, 16, 1, "rowmajor")
    b = timer.seconds(8, 16, 1, "transposed")
    assert a > 0 and b > 0 and timer.measured == 2
    timer.save()
    again = GemmTimer(path)
    assert again.seconds(8, 16, 1, "rowmajor") == a and again.measured == 0
    assert again.seconds(8, 16, 2, "rowmajor") > 0 and again.measured == 1  # tokens are part of the key
    with pytest.raises(ValueError, match="layout"):
        timer.seconds(8, 16, 1, "diagonal")


def test_gemm_timer_keeps_timings_of_each_openmp_wait_policy_apart(tmp_path, monkeypatch):
    """A passive-waiting process's timings (a thread wake-up per call) must not steer a default one."""
    path = tmp_path / "timings.json"
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    timer = GemmTimer(path, repeats=1, min_seconds=1e-4, stream_bytes=1)
    passive = timer.seconds(8, 16, 1)
    assert "|omp=PASSIVE|" in GemmTimer.key(8, 16, 1, "rowmajor", torch.float32, torch.device("cpu"))
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert "|omp=default|" in GemmTimer.key(8, 16, 1, "rowmajor", torch.float32, torch.device("cpu"))
    default = timer.seconds(8, 16, 1)
    assert timer.measured == 2 and passive > 0 and default > 0  # measured again, not read back
    timer.save()
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    again = GemmTimer(path)
    assert again.seconds(8, 16, 1) == passive and again.measured == 0


@pytest.mark.slow
def test_compiled_path_matches_the_compiled_unfused_model(compressed):
    """``compile=True`` (about a minute or two of compilation on 2 cores).  Compared with the *compiled*
    unfused model: HF's RMSNorm runs in float32 even in a float64 model, and inductor's fused float32
    kernels round differently from eager ones (~1e-8), which says nothing about the shared downs."""
    model, _ = compressed
    ref = copy.deepcopy(model)
    ref.forward = torch.compile(ref.forward, dynamic=True)
    report = optimize_for_inference_(model, example={"input_ids": tokens()}, merge="never", timer=FixedTimer(),
                                     compile=True)
    assert report.compiled
    with torch.no_grad():
        for ids in (tokens(), tokens(1, 7, seed=5)):
            assert rel_err(model(input_ids=ids).logits, ref(input_ids=ids).logits) <= 1e-10


def decode_against_eager(model, ref, steps=4, prompt=8):
    """Greedy decode (tokens chosen by the eager ``ref``) through both models with growing ``DynamicCache``s,
    the prompt run eagerly (as benchmarks/llm_efficiency.py does): (max relative logit error over the
    1-token steps, graphs torch.compile compiled during those steps)."""
    from torch._dynamo.utils import counters
    from transformers import DynamicCache

    # every test compiling LlamaForCausalLM.forward shares dynamo's per-code-object recompile limit (8 graphs,
    # then it runs eagerly without a graph): each decode starts from an empty dynamo cache
    torch._dynamo.reset()
    ids = tokens(1, prompt, seed=7)
    cache, ref_cache = DynamicCache(), DynamicCache()
    with torch.no_grad():
        with torch.compiler.set_stance("force_eager"):
            out = model(input_ids=ids, **{cache_keyword(model): cache}, use_cache=True)
        want = ref(input_ids=ids, **{cache_keyword(ref): ref_cache}, use_cache=True)
        errors = [rel_err(out.logits, want.logits)]
        before = counters["stats"]["unique_graphs"]
        for _ in range(steps):
            token = want.logits[:, -1:].argmax(-1)
            out = model(input_ids=token, **{cache_keyword(model): cache}, use_cache=True)
            want = ref(input_ids=token, **{cache_keyword(ref): ref_cache}, use_cache=True)
            errors.append(rel_err(out.logits, want.logits))
    assert cache.get_seq_length() == ref_cache.get_seq_length() == prompt + steps
    return max(errors), counters["stats"]["unique_graphs"] - before


def test_compiled_decode_with_a_growing_cache_is_one_graph_and_exact(monkeypatch):
    """``compile=True`` as the decode benchmark uses it: the 1-token step with a growing KV cache is traced
    once (the cache length is dynamic: no recompile per token) and matches the eager *unfused* model.
    The backend is "eager" (dynamo's graph capture and guards, the captured graph run by eager torch: seconds,
    not minutes); inductor itself is checked by the slow test below."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    model = make_tiny_llama()
    compress_(model, Recipe("svd", ratio=0.4))
    ref = copy.deepcopy(model)
    report = optimize_for_inference_(model, batch_tokens=1, example={"input_ids": tokens(1, 8)}, merge="never",
                                     timer=FixedTimer(), compile=True)
    assert report.compiled and report.groups
    error, graphs = decode_against_eager(model, ref)
    assert graphs == 1 and error <= 1e-5


def test_cpp_wrapper_reaches_inductor_only_with_compile(monkeypatch):
    """``cpp_wrapper=True`` is an inductor option of the compiled forward (the shared-product pass kept); it is
    refused without ``compile=True`` rather than silently ignored."""
    seen = []

    def fake_compile(fn, **kwargs):
        seen.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = make_tiny_llama()
    compress_(model, Recipe("svd", ratio=0.4))
    with pytest.raises(ValueError, match="pass compile=True"):
        optimize_for_inference_(copy.deepcopy(model), timer=FixedTimer(), cpp_wrapper=True)
    optimize_for_inference_(model, timer=FixedTimer(), compile=True, cpp_wrapper=True)
    compile_forward_(make_tiny_llama())
    assert [sorted(k["options"]) for k in seen] == [["cpp_wrapper", "post_grad_custom_pre_pass"],
                                                     ["post_grad_custom_pre_pass"]]
    assert seen[0]["options"]["cpp_wrapper"] is True and all(k["dynamic"] for k in seen)


@pytest.mark.slow
@pytest.mark.parametrize("cpp_wrapper", [False, True])
def test_inductor_decode_matches_the_eager_unfused_model(cpp_wrapper):
    """The same with inductor (a minute or more of compilation on 2 cores; the C++ wrapper takes longer):
    float32 kernels, ~2e-7 from eager here."""
    model = make_tiny_llama()
    compress_(model, Recipe("svd", ratio=0.4))
    ref = copy.deepcopy(model)
    optimize_for_inference_(model, batch_tokens=1, example={"input_ids": tokens(1, 8)}, merge="never",
                            timer=FixedTimer(), compile=True, cpp_wrapper=cpp_wrapper)
    error, graphs = decode_against_eager(model, ref)
    assert graphs == 1 and error <= 1e-5


def test_any_model_with_biases_and_a_layer_the_example_skips():
    """Not only LLaMA: two biased factored layers reading one tensor share a down GEMM; a layer the
    example never reaches is laid out on its own."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            dense = [torch.nn.Linear(8, out, dtype=torch.float64) for out in (6, 5, 8)]
            f64 = {"dtype": torch.float64}
            self.a, self.b, self.c = (LowRankLinear.from_linear(d, 3, torch.randn(d.out_features, 3, **f64),
                                                                torch.randn(3, 8, **f64)) for d in dense)

        def forward(self, x, use_c=False):
            y = torch.cat([self.a(x), self.b(x)], -1)
            return self.c(x) if use_c else y

    net = Net()
    ref = copy.deepcopy(net)
    x = torch.randn(4, 7, 8, dtype=torch.float64)
    report = optimize_for_inference_(net, example=x, merge="never", timer=FixedTimer())
    assert report.groups == [["a", "b"]] and net.c.shared is None and net.a.shared is net.b.shared
    with torch.no_grad():
        assert rel_err(net(x), ref(x)) <= 1e-10 and rel_err(net(x, True), ref(x, True)) <= 1e-10
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in net.state_dict().items())
