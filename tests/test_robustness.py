"""Bad files and bad inputs get one clear error naming the file or field.

Covers issue 13 items 4-5 on the library side: plan validation, the model/plan check before an
export, per-file checksums, corrupted / truncated / missing files, orphaned temporaries of
killed writes, ordinary file modes, damaged VGGT weights, the small-calibration warning of
whitening.  Malicious pickles: ``test_unsafe_load.py``; mutation gaps: ``test_mutation_gaps.py``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compression import LowRankLinear, Recipe, collect_stats, compress_
from compression.export import MANIFEST_NAME, PLAN_NAME, WEIGHTS_NAME, load_compressed, save_compressed
from compression.io import atomic_write_text, remove_orphans, safe_torch_load, temp_sibling
from compression.plan import load_plan, make_plan, save_plan, validate_plan
from tests.malicious import malicious_pickle
from tests.test_export import compressed_llama

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
Q = "model.layers.0.self_attn.q_proj"


def good_plan() -> dict:
    return make_plan({"name": "svd"}, 0.5, "uniform",
                     {"a.fc": {"rank": 4, "in_features": 16, "out_features": 8, "bias": True}})


def flip_byte(path: Path, offset_from_end: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


# -- plan validation ------------------------------------------------------------------------------
def _without_layers(p):
    del p["layers"]


def _set_layer(key, value):
    def edit(p):
        p["layers"]["a.fc"][key] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set_layer("rank", 0), r"layer 'a.fc': 'rank' must be >= 1, got 0"),
    (_set_layer("rank", -3), r"layer 'a.fc': 'rank' must be >= 1, got -3"),
    (_set_layer("rank", 2.5), r"layer 'a.fc': 'rank' must be an integer, got 2.5 \(float\)"),
    (_set_layer("rank", "4"), r"layer 'a.fc': 'rank' must be an integer, got '4' \(str\)"),
    (_set_layer("rank", True), r"layer 'a.fc': 'rank' must be an integer, got True \(bool\)"),
    (_set_layer("rank", 9), r"layer 'a.fc': 'rank' 9 exceeds min\(in_features, out_features\) = 8"),
    (_set_layer("in_features", 0), r"layer 'a.fc': 'in_features' must be a positive integer, got 0"),
    (_set_layer("out_features", "8"), r"layer 'a.fc': 'out_features' must be a positive integer, got '8'"),
    (_set_layer("bias", 1), r"layer 'a.fc': 'bias' must be true or false, got 1"),
    (lambda p: p["layers"]["a.fc"].pop("rank"), r"layer 'a.fc': entry lacks \['rank'\]"),
    (lambda p: p["layers"].__setitem__("b", 4), r"layer 'b': entry must be an object, got 4"),
    (_without_layers, r"lacks the 'layers' section"),
    (lambda p: p.__setitem__("layers", []), r"'layers' must map layer names to entries, got list"),
    (lambda p: p.__setitem__("ratio", 1.5), r"'ratio' must be a number in \[0, 1\)"),
    (lambda p: p.__setitem__("ratio", "0.2"), r"'ratio' must be a number in \[0, 1\)"),
    (lambda p: p.__setitem__("method", "svd"), r"'method' must be an object with a string 'name'"),
    (lambda p: p.__setitem__("allocation", None), r"'allocation' must be a string"),
    (lambda p: p.__setitem__("version", 2), r"version 2 is not supported"),
    (lambda p: p.__setitem__("format", "x"), r"'format' is 'x', expected 'svd-vggt/plan'"),
    (lambda p: p.__setitem__("quantization", {"weight": None}), r"section 'quantization' lacks 'layers'"),
    (lambda p: p.__setitem__("quantization", {"layers": "a.fc"}), r"'quantization.layers' must be a list"),
    (lambda p: p.__setitem__("rotation", []), r"section 'rotation' must be an object"),
])
def test_bad_plan_fields_are_named(edit, message):
    plan = good_plan()
    validate_plan(plan)
    edit(plan)
    with pytest.raises(ValueError, match=message):
        validate_plan(plan)


@pytest.mark.parametrize("edit, message", [
    (lambda g: g.__setitem__("rank", 0), r"joint group 'attn': 'rank' must be >= 1"),
    (lambda g: g.__setitem__("rank", 17), r"joint group 'attn': 'rank' 17 exceeds .* = 16"),
    (lambda g: g.__setitem__("members", ["q", "q", "v"]), r"joint group 'attn': 'members' .* repeats"),
    (lambda g: g.__setitem__("out_features", [16, 8]), r"joint group 'attn': 'out_features' must list one size"),
    (lambda g: g.__setitem__("bias", [False, 0, False]), r"joint group 'attn': 'bias' must list true/false"),
])
def test_bad_joint_groups_are_named(edit, message):
    group = {"members": ["q", "k", "v"], "rank": 12, "in_features": 16, "out_features": [16, 8, 8],
             "bias": [False, False, False]}
    plan = make_plan({"name": "svd"}, 0.3, "joint", {}, joint_groups={"attn": group})
    validate_plan(plan)
    edit(group)
    with pytest.raises(ValueError, match=message):
        validate_plan(plan)


def test_version_one_plans_of_existing_checkpoints_still_load(tmp_path):
    # the module docstring's example, as older code wrote it (no new fields), and a QSVD-shaped plan
    old = {"format": "svd-vggt/plan", "version": 1, "method": {"name": "svd_llm", "beta": 0.5}, "ratio": 0.2,
           "allocation": "uniform",
           "layers": {"model.layers.0.self_attn.q_proj": {"rank": 96, "in_features": 576, "out_features": 576,
                                                          "bias": False}},
           "joint_groups": {"model.layers.1.self_attn": {"members": ["q_proj", "k_proj", "v_proj"], "rank": 240,
                                                         "in_features": 576, "out_features": [576, 192, 192],
                                                         "bias": [False, False, False]}},
           "quantization": {"weight": {"bits": 4}, "act": None, "layers": ["model.layers.0.mlp.up_proj"]},
           "rotation": {"residual": {"kind": "random_hadamard", "seed": 0, "size": 576}, "untied": True}}
    (tmp_path / "plan.json").write_text(json.dumps(old))
    assert load_plan(tmp_path / "plan.json") == old


def test_plan_files_missing_or_unparseable_are_named(tmp_path):
    missing = tmp_path / "nowhere" / "plan.json"
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(missing))} not found; .*save_plan.*save_compressed"):
        load_plan(missing)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "svd-vggt/plan",\n "version": 1,,}')
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))} is not valid JSON: .* line 2, column 15 "
                                         r"\(character 42\)"):
        load_plan(bad)
    binary, _ = malicious_pickle(tmp_path / "pickled.json")
    with pytest.raises(ValueError, match=rf"{re.escape(str(binary))} is not"):
        load_plan(binary)
    save_plan(good_plan(), tmp_path / "ok.json")
    (tmp_path / "rank0.json").write_text((tmp_path / "ok.json").read_text().replace('"rank": 4', '"rank": 0'))
    with pytest.raises(ValueError, match=r"compression plan .*rank0.json: layer 'a.fc': 'rank' must be >= 1"):
        load_plan(tmp_path / "rank0.json")


# -- save_compressed checks the model against the plan --------------------------------------------
@pytest.fixture(scope="module")
def compressed(token_batches_module):
    return compressed_llama(token_batches_module)


@pytest.fixture(scope="module")
def token_batches_module():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 128, (2, 24), generator=g)} for _ in range(4)]


def _plan_with(plan, edit):
    plan = copy.deepcopy(plan)
    edit(plan)
    return plan


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["layers"][Q].__setitem__("rank", p["layers"][Q]["rank"] + 1),
     rf"layer '{Q}' has \(out, in, rank, bias\) = \(64, 64, \d+, False\), the plan says \(64, 64, \d+, False\)"),
    (lambda p: p["layers"].pop(Q), rf"1 LowRankLinear layer\(s\) the plan does not list: \['{Q}'\]"),
    (lambda p: p["layers"].__setitem__("model.layers.0.mlp.ghost", dict(p["layers"][Q])),
     r"layer 'model.layers.0.mlp.ghost' does not exist in the model"),
    (lambda p: p["layers"].__setitem__("lm_head", {"rank": 8, "in_features": 64, "out_features": 128, "bias": False}),
     r"layer 'lm_head' is a Linear, the plan says LowRankLinear"),
    (lambda p: p.__setitem__("quantization", {"weight": None, "act": None, "layers": [f"{Q}.up"]}),
     rf"quantized layer '{Q}.up' is Linear, the plan says QuantLinear"),
])
def test_export_refuses_a_model_that_does_not_match_its_plan(tmp_path, compressed, edit, message):
    model, plan = compressed
    with pytest.raises(ValueError, match="does not match the compression plan.*" + message):
        save_compressed(model, tmp_path / "e", _plan_with(plan, edit))
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary


def test_a_qsvd_model_matches_its_plan_and_round_trips(tmp_path, token_batches_module):
    from lightning_modules.specs import CausalLMSpec
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    recipe = Recipe("svd_llm_v2", ratio=0.3, joint_qkv=True, targets=["q_proj", "k_proj", "v_proj"],
                    quantization={"weight_bits": 4, "act_bits": 8, "rotate": True})
    plan = compress_(model, recipe, family=CausalLMSpec(model=model), batches=token_batches_module).plan
    assert {"joint_groups", "rotation", "quantization"} <= set(plan)
    with pytest.raises(ValueError, match=r"online-Hadamard MLPs differ from the plan's rotation section: only in "
                                         r"the model \['model.layers.0.mlp', 'model.layers.1.mlp'\]"):
        save_compressed(model, tmp_path / "e", {k: v for k, v in plan.items() if k != "rotation"})
    out = save_compressed(model, tmp_path / "e", plan)
    loaded, _ = load_compressed(out)
    x = token_batches_module[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


# -- checksums and damaged exports ----------------------------------------------------------------
def test_manifest_records_checksums_and_a_flipped_byte_is_named(tmp_path, compressed, token_batches_module):
    model, plan = compressed
    out = save_compressed(model, tmp_path / "e", plan)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["compressed"] is True and set(manifest["files"]) == {WEIGHTS_NAME}
    from compression.io import sha256_file

    assert manifest["files"][WEIGHTS_NAME] == {"sha256": sha256_file(out / WEIGHTS_NAME),
                                               "bytes": (out / WEIGHTS_NAME).stat().st_size}
    load_compressed(out)  # verifies and loads
    flip_byte(out / WEIGHTS_NAME)  # inside the last tensor's data: safetensors alone cannot see it
    with pytest.raises(ValueError, match=rf"checksum mismatch: {re.escape(str(out / WEIGHTS_NAME))} has sha256"):
        load_compressed(out)
    # without the manifest the same file loads -- silently wrong -- which is why the checksum exists
    (out / MANIFEST_NAME).unlink()
    loaded, _ = load_compressed(out)
    assert any(not torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_damaged_exports_each_get_one_message_naming_the_file(tmp_path, compressed, caplog):
    model, plan = compressed
    out = save_compressed(model, tmp_path / "e", plan)
    weights, plan_path, manifest = out / WEIGHTS_NAME, out / PLAN_NAME, out / MANIFEST_NAME
    good = weights.read_bytes()

    plan_path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(plan_path))} is missing: .*save_compressed"):
        load_compressed(out)
    save_plan(plan, plan_path)

    manifest_text = manifest.read_text()
    manifest.write_text(manifest_text[:40])
    with pytest.raises(ValueError, match=rf"{re.escape(str(manifest))} is not valid JSON: .* line \d+, column \d+"):
        load_compressed(out)
    manifest.write_text(manifest_text)

    plan_path.write_text(plan_path.read_text()[:-30])
    with pytest.raises(ValueError, match=rf"{re.escape(str(plan_path))} is not valid JSON: .*\(character \d+\)"):
        load_compressed(out)
    save_plan(plan, plan_path)

    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=rf"checksum mismatch: {re.escape(str(weights))}"):
        load_compressed(out)
    manifest.unlink()  # an older export without checksums: the format error is still named
    with caplog.at_level(logging.WARNING, logger="compression.export"):
        with pytest.raises(ValueError, match=rf"{re.escape(str(weights))} is not a readable safetensors file "
                                             r"\(.*incomplete metadata"):
            load_compressed(out)
    assert f"has no {MANIFEST_NAME}" in caplog.text


# -- temporaries of killed writes, file modes -------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_orphans_of_the_same_destination_are_removed_and_nothing_else(tmp_path):
    from compression.io import _HOST

    dest = tmp_path / "plan.json"
    dead = _dead_pid()
    orphan = tmp_path / f".plan.json.{_HOST}.{dead}.0123abcd.tmp"
    orphan_dir = tmp_path / f".plan.json.{_HOST}.{dead}.4567cdef.tmp"
    keep = [
        tmp_path / f".plan.json.{_HOST}.{os.getpid()}.89abcdef.tmp",  # a live writer (this process)
        tmp_path / f".plan.json.otherhost.{dead}.0123abcd.tmp",  # another host: its processes are unknown here
        tmp_path / f".plan.json.x.{_HOST}.{dead}.0123abcd.tmp",  # the temporary of destination 'plan.json.x'
        tmp_path / f".plan.json.{_HOST}.{dead}.tmp",  # not our pattern
        tmp_path / "notes.txt",
    ]
    for p in [orphan, *keep]:
        p.write_text("x")
    orphan_dir.mkdir()
    (orphan_dir / "model.safetensors").write_text("half")
    atomic_write_text(dest, "{}")
    assert dest.read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dest.name, *(p.name for p in keep)])
    assert remove_orphans(dest) == []


def test_a_killed_writer_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    dest = tmp_path / "model.ckpt"
    script = (
        "import sys, time; from compression.io import atomic_write\n"
        "def write(f):\n    f.write(b'partial'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
        f"atomic_write({str(dest)!r}, write)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()
        proc.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.ckpt.") and left[0].endswith(".tmp") and not dest.exists()
    from compression.io import atomic_torch_save

    atomic_torch_save({"w": torch.ones(2)}, dest)
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]
    assert torch.equal(safe_torch_load(dest)["w"], torch.ones(2))


def test_export_orphans_are_removed_by_the_next_export(tmp_path, compressed):
    from compression.io import _HOST

    model, plan = compressed
    orphan = tmp_path / f".e.{_HOST}.{_dead_pid()}.00ff00ff.tmp"
    orphan.mkdir()
    (orphan / WEIGHTS_NAME).write_bytes(b"half an export")
    save_compressed(model, tmp_path / "e", plan)
    assert [p.name for p in tmp_path.iterdir()] == ["e"]


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_files_get_ordinary_modes(tmp_path, compressed, umask, file_mode, dir_mode):
    model, plan = compressed
    old = os.umask(umask)
    try:
        ckpt = tmp_path / "ckpt" / "compressed.ckpt"
        from compression.io import atomic_torch_save

        atomic_torch_save({"w": torch.ones(1)}, ckpt)
        out = save_compressed(model, tmp_path / "export", plan)
        tmp = temp_sibling(tmp_path / "x", directory=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(ckpt.stat().st_mode) == file_mode
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    assert stat.S_IMODE(tmp.stat().st_mode) == dir_mode
    for name in (WEIGHTS_NAME, PLAN_NAME, MANIFEST_NAME, "config.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == file_mode, name


# -- VGGT weights ------------------------------------------------------------------------------------
def test_vggt_weights_record_and_check_their_checksum(tmp_path):
    from lightning_modules.vggt_spec import TESTBED_WEIGHTS, VGGTSpec, load_vggt_weights, save_vggt_weights

    assert len(load_vggt_weights(TESTBED_WEIGHTS)) > 0  # the committed testbed matches its recorded sha256
    model = VGGTSpec(config_overrides={"embed_dim": 32}).build()
    path = save_vggt_weights(model, tmp_path / "w.safetensors")
    side = json.loads(path.with_suffix(".json").read_text())
    from compression.io import sha256_file

    assert side["sha256"] == sha256_file(path)
    flip_byte(path)
    with pytest.raises(ValueError, match=rf"checksum mismatch: {re.escape(str(path))} .*w\.json records"):
        VGGTSpec(weights=str(path), config_overrides={"embed_dim": 32}).build()
    path.with_suffix(".json").unlink()  # an official file has no side JSON: the format is still checked
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not a readable safetensors file"):
        load_vggt_weights(path)


# -- calibration too small for whitening ----------------------------------------------------------------
class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(24, 16)
        self.narrow = nn.Linear(16, 8)

    def forward(self, x):
        return self.narrow(self.wide(x))


@pytest.mark.parametrize("method", ["svd_llm", "svd_llm_v2"])
@pytest.mark.parametrize("allocation", ["uniform", "v2"])
def test_too_few_calibration_tokens_warn_with_the_numbers(method, allocation, caplog):
    model = TwoLayers()
    stats = collect_stats(model, ["wide", "narrow"], [torch.randn(20, 24)])
    with caplog.at_level(logging.WARNING, logger="compression.methods"):
        compress_(model, Recipe(method=method, ratio=0.3, allocation=allocation,
                                           targets=["wide", "narrow"]), stats)
    small = [r.getMessage() for r in caplog.records if "fewer than whitening needs" in r.getMessage()]
    # 20 tokens: 'wide' (24 inputs) is short of data, 'narrow' (16 inputs) is not; warned once despite
    # check_stats running for the pre-check, the v2 spectrum and the decomposition
    assert len(small) == 1
    assert "'wide'" in small[0] and "20 tokens for 24 input channels" in small[0] and method in small[0]
    assert isinstance(model.wide, LowRankLinear)


def test_no_small_calibration_warning_without_a_gram(caplog):
    model = TwoLayers()
    stats = collect_stats(model, ["wide", "narrow"], [torch.randn(20, 24)])
    with caplog.at_level(logging.WARNING, logger="compression.methods"):
        compress_(model, Recipe(method="asvd", ratio=0.3, targets=["wide", "narrow"]), stats)
    assert "fewer than whitening needs" not in caplog.text
