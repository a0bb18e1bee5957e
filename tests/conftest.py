"""Shared fixtures: tiny models built in-process, deterministic seeds, CPU threads."""

from __future__ import annotations

import os

# before torch loads OpenMP: spinning worker threads starve on a shared CPU (see the Makefile)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def layer_inputs(model, names, batches) -> dict:
    """Every named layer's inputs over ``batches`` (tokens stacked), from forward pre-hooks."""
    seen = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1]))) for n in names]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def make_tiny_llama(seed: int = 0, tie: bool = True):
    """A random-init LLaMA with grouped-query attention (4 query heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.

    Tiny models run faster on one intra-op thread on a shared 2-core machine: per [200 x 64]
    linear under load, 0.045 ms vs 0.07 ms on two threads with passive OpenMP waiting (conftest),
    and vs 7 ms with spinning waits."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def token_batches():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 128, (2, 24), generator=g)} for _ in range(4)]


QKV = ["q_proj", "k_proj", "v_proj"]


def compress_joint(model, method="svd_llm_v2", stats=None, family=None, importances=None, **fields):
    """Joint q/k/v factorization of every attention module through the recipe entry point (the groups come
    from the family's layout: ``CausalLMSpec`` unless another family is given)."""
    from compression import Recipe, compress_
    from lightning_modules.specs import CausalLMSpec

    family = family if family is not None else CausalLMSpec(model=model)
    return compress_(model, Recipe(method, joint_qkv=True, targets=QKV, **fields), stats, family=family,
                     importances=importances)
