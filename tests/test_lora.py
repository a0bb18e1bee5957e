"""UVLoRA on a tiny LLaMA: one side trains per stage, merges keep ranks, evaluation after LoRA matches."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger

from callbacks import UVLoRA
from callbacks.lora import cosine_factor, fold_lora_state_dict_, lora_layers
from compression import LoRARecipe, LowRankLinear, Recipe
from lightning_modules import CausalLMSpec, CompressionModule
from lightning_modules.checkpoint_io import AtomicCheckpointIO
from tests.conftest import make_tiny_llama
from tests.lightning_helpers import TinyTokens

FACTOR = "model.layers.0.self_attn.q_proj"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


class OrderedTokens(TinyTokens):
    """TinyTokens without shuffling: the same batches in the same order on every run."""

    def train_dataloader(self):
        return self._loader(8, 2, shuffle=False)


class Recorder(Callback):
    """Per optimizer step: the loss, the logged stage, and copies of one layer's factors and adapters."""

    def __init__(self) -> None:
        self.losses, self.stages, self.snapshots = [], [], []
        self.grad_flags: dict[str, bool] = {}
        self.logits_before_unwrap = None

    def on_train_start(self, trainer, pl_module):
        self.grad_flags = {n: p.requires_grad for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.stages.append(float(trainer.callback_metrics["lora/stage"]))
        layer = pl_module.model.get_submodule(FACTOR)
        snap = {}
        for side in ("down", "up"):
            f = getattr(layer, side)
            snap[side] = f.base_layer.weight.detach().clone()
            snap[side + ".A"] = f.lora_A["default"].weight.detach().clone()
            snap[side + ".B"] = f.lora_B["default"].weight.detach().clone()
        self.snapshots.append(snap)

    def on_train_end(self, trainer, pl_module):  # before UVLoRA.on_fit_end merges and unwraps
        self.logits_before_unwrap = probe_logits(pl_module)


def probe_logits(pl_module):
    ids = torch.arange(16).view(1, 16) % 128
    with torch.no_grad():
        was = pl_module.model.training
        pl_module.model.eval()
        out = pl_module.model(input_ids=ids).logits
        pl_module.model.train(was)
    return out


def lora_module(learning_rate: float = 1e-2, model_seed: int = 0, **lora) -> tuple[CompressionModule, UVLoRA]:
    """svd_llm at 0.3, then U/V LoRA with ``lora`` (the recipe's lora part) on the tiny LLaMA initialized with
    ``model_seed``; the module and its UVLoRA stage."""
    recipe = Recipe("svd_llm", ratio=0.3, calibration={"progress": False}, lora=lora)
    module = CompressionModule(CausalLMSpec(model=make_tiny_llama(seed=model_seed)), compression=recipe,
                               learning_rate=learning_rate)
    return module, module.stage_callbacks()[-1]


def lora_trainer(tmp_path, extra=(), **kw) -> Trainer:
    callbacks = list(extra)
    kw.setdefault("max_steps", -1)
    kw.setdefault("max_epochs", 100)
    return Trainer(accelerator="cpu", devices=1, callbacks=callbacks, enable_progress_bar=False,
                   logger=CSVLogger(tmp_path, name="run"), plugins=[AtomicCheckpointIO()], enable_model_summary=False,
                   num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False, deterministic=True, **kw)


def changed(a, b) -> bool:
    return not torch.equal(a, b)


@pytest.mark.parametrize("order", [["down", "up"], ["up", "down"]])
def test_stages_train_one_side_each_and_merges_keep_ranks(tmp_path, order):
    module, _ = lora_module(order=order, steps=[3, 3], r=2, alpha=4, dropout=0.0)
    rec = Recorder()
    t = lora_trainer(tmp_path, [rec])
    t.fit(module, datamodule=OrderedTokens())
    first, second = order

    # only adapters require grad, both sides' (see callbacks/lora.py: DDP needs a fixed set)
    assert rec.grad_flags and all(flag == (".lora_" in n) for n, flag in rec.grad_flags.items())
    assert sum(rec.grad_flags.values()) == 14 * 2 * 2  # 14 layers x 2 sides x (A, B)
    assert rec.stages == [1, 1, 1, 2, 2, 2]
    s = rec.snapshots
    # stage 1 (steps 0-2): only the first side's adapters move; the factors themselves stay put
    assert changed(s[0][first + ".B"], s[2][first + ".B"])
    assert torch.equal(s[0][second + ".A"], s[2][second + ".A"]) and not s[2][second + ".B"].any()
    assert torch.equal(s[0][first], s[2][first]) and torch.equal(s[0][second], s[2][second])
    # boundary: the first side merged into its factor (shape kept), its B zeroed and frozen from then on
    assert changed(s[2][first], s[3][first]) and s[3][first].shape == s[2][first].shape
    assert not s[3][first + ".B"].any() and not s[5][first + ".B"].any()
    assert torch.equal(s[3][first + ".A"], s[5][first + ".A"]) and torch.equal(s[3][first], s[5][first])
    assert changed(s[3][second + ".B"], s[5][second + ".B"]) and torch.equal(s[3][second], s[5][second])

    # after fit: plain low-rank layers at the planned ranks, the merge changed no output
    assert not lora_layers(module.model)
    ranks = {n: m.rank for n, m in module.model.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks == {n: spec["rank"] for n, spec in module.plan["layers"].items()}
    layer = module.model.get_submodule(FACTOR)
    assert layer.down.weight.shape == (layer.rank, 64) and layer.up.weight.shape == (64, layer.rank)
    torch.testing.assert_close(probe_logits(module), rec.logits_before_unwrap, rtol=0, atol=1e-5)
    assert not any(p.requires_grad for p in module.parameters())


class ModeRecorder(Callback):
    """The training flag of every module of the model at the start of training and at each step."""

    def __init__(self) -> None:
        self.eval_at_start: list[str] | None = None
        self.eval_in_steps: set[str] = set()

    def on_train_start(self, trainer, pl_module):
        self.eval_at_start = [n for n, m in pl_module.model.named_modules() if not m.training]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.eval_in_steps |= {n for n, m in pl_module.model.named_modules() if not m.training}


def test_a_model_loaded_in_eval_mode_trains_in_train_mode_and_gets_its_mode_back(tmp_path, recwarn):
    """transformers' loaders return eval mode; before, only the modules compression added trained in train mode (the
    model's own dropout and gradient checkpointing off) and Lightning warned of 'modules in eval mode'."""
    recipe = Recipe("svd_llm", ratio=0.3, calibration={"progress": False},
                    lora={"steps": [2, 2], "r": 2, "dropout": 0.0, "distill": 1.0})
    module = CompressionModule(CausalLMSpec(model=make_tiny_llama(seed=0).eval()), compression=recipe)
    rec = ModeRecorder()
    lora_trainer(tmp_path, [rec]).fit(module, datamodule=OrderedTokens())
    assert rec.eval_at_start == [] and rec.eval_in_steps == set()
    assert not any("in eval mode" in str(w.message) for w in recwarn.list)
    assert not any(m.training for m in module.model.modules())  # back in eval mode after fit
    assert not module.teacher.training  # the dense teacher never left eval mode


def test_joint_stages_train_both_sides_and_restart_at_the_boundary(tmp_path):
    lr, r, alpha = 1e-2, 2, 4.0
    module, stage = lora_module(learning_rate=lr, order=["both", "both"], steps=[3, 3], r=r, alpha=alpha, dropout=0.0)
    rec = Recorder()
    lora_trainer(tmp_path, [rec]).fit(module, datamodule=OrderedTokens())
    assert rec.stages == [1, 1, 1, 2, 2, 2]
    s = rec.snapshots
    for side in ("down", "up"):
        # stage 1: both sides' adapters train at once, the factors stay put
        assert changed(s[0][side + ".B"], s[2][side + ".B"]) and torch.equal(s[0][side], s[2][side])
        # boundary: each side merged exactly (W + (alpha / r) B A), B restarted from zero with fresh AdamW
        # moments: one step from B = 0 leaves A untouched (its gradient is Bᵀ(...) = 0) and moves each entry
        # of B by at most the learning rate (the bias-corrected first Adam step)
        merged = s[2][side] + (alpha / r) * s[2][side + ".B"] @ s[2][side + ".A"]
        torch.testing.assert_close(s[3][side], merged, rtol=0, atol=1e-6)
        assert torch.equal(s[3][side + ".A"], s[2][side + ".A"])
        assert 0 < s[3][side + ".B"].abs().max() <= lr * (1 + 1e-4)
        # stage 2: both train again, the factors stay at their merged values
        assert changed(s[3][side + ".B"], s[5][side + ".B"]) and changed(s[3][side + ".A"], s[5][side + ".A"])
        assert torch.equal(s[3][side], s[5][side])
    assert stage.merged == ["down", "up"] and not lora_layers(module.model)
    torch.testing.assert_close(probe_logits(module), rec.logits_before_unwrap, rtol=0, atol=1e-5)


def test_epochs_per_stage_convert_to_steps(tmp_path):
    module, lora = lora_module(epochs=[1, 2], r=2, dropout=0.0)
    rec = Recorder()
    lora_trainer(tmp_path, [rec], accumulate_grad_batches=2).fit(module, datamodule=OrderedTokens())
    assert lora.boundaries == [2, 6]  # 4 batches per epoch, 2 per optimizer step
    assert rec.stages == [1.0] * 4 + [2.0] * 8  # logged per batch: 2 batches per step


class LearningRates(Callback):
    """The optimizer's learning rates at every optimizer step (read after UVLoRA set them)."""

    def __init__(self) -> None:
        self.rates: list[list[float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rates.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_cosine_schedule_restarts_in_each_stage():
    assert cosine_factor(0, 4, 0) == 1.0 and cosine_factor(0, 4, 2) == pytest.approx(0.5)
    assert cosine_factor(0, 4, 3) == pytest.approx((1 - 0.5**0.5) / 2)
    assert cosine_factor(0, 4, 4) == pytest.approx(0.0, abs=1e-12)
    assert cosine_factor(2, 6, 1) == 1.0 and cosine_factor(2, 6, 2) == 1.0
    assert cosine_factor(2, 6, 4) == pytest.approx(0.5)  # half way through the 4 decay steps


@pytest.mark.parametrize("learning_rate", [None, [1e-2, 4e-3]])
def test_lora_cosine_schedule_per_stage(tmp_path, learning_rate):
    recipe = Recipe("svd_llm", ratio=0.3, calibration={"progress": False},
                    lora={"steps": [4, 6], "r": 2, "dropout": 0.0, "schedule": "cosine", "warmup": 0.25,
                          "learning_rate": learning_rate})
    module = CompressionModule(CausalLMSpec(model=make_tiny_llama(seed=0)), compression=recipe, learning_rate=2e-2)
    rec = LearningRates()
    lora_trainer(tmp_path, [rec]).fit(module, datamodule=OrderedTokens())
    base = [2e-2, 2e-2] if learning_rate is None else learning_rate
    # stage 1: 4 steps, warm-up ceil(0.25 * 4) = 1 step, then cos over 3; stage 2: 6 steps, warm-up 2, cos over 4
    expected = [base[0] * f for f in (1.0, 1.0, 0.75, 0.25)]
    expected += [base[1] * f for f in (0.5, 1.0, 1.0, (1 + 0.5**0.5) / 2, 0.5, (1 - 0.5**0.5) / 2)]
    assert [r[0] for r in rec.rates] == pytest.approx(expected, rel=1e-12)


def test_lora_cosine_schedule_refuses_a_second_scheduler(tmp_path):
    recipe = Recipe("svd_llm", ratio=0.3, calibration={"progress": False},
                    lora={"steps": [2, 2], "r": 2, "schedule": "cosine"})
    with pytest.raises(ValueError, match="leave the module's lr_schedule at 'constant'"):  # up front
        CompressionModule(CausalLMSpec(model=make_tiny_llama(seed=0)), compression=recipe, lr_schedule="cosine")

    class WithScheduler(CompressionModule):  # a scheduler the module's arguments do not show (the CLI's)
        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.ConstantLR(optimizer)}

    module = WithScheduler(CausalLMSpec(model=make_tiny_llama(seed=0)), compression=recipe, learning_rate=1e-2)
    with pytest.raises(ValueError, match="leave the module's lr_schedule at 'constant'"):
        lora_trainer(tmp_path, max_steps=4).fit(module, datamodule=OrderedTokens())


def test_recovery_lowers_training_loss_and_evaluates_the_same_after_reload(tmp_path):
    dm = OrderedTokens()
    module, _ = lora_module(learning_rate=2e-2, steps=[8, 8], r=4, alpha=8, dropout=0.0)
    rec = Recorder()
    t = lora_trainer(tmp_path, [rec])
    t.fit(module, datamodule=dm)
    assert len(rec.losses) == 16
    # 4 batches per epoch: compare the same batches in the first and the last epoch
    assert sum(rec.losses[-4:]) < sum(rec.losses[:4]) - 0.05

    in_memory = t.test(module, datamodule=dm, verbose=False)[0]
    ckpt = tmp_path / "recovered.ckpt"
    t.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert "uv_lora" not in saved and not any(".lora_" in k for k in saved["state_dict"])
    fresh = CompressionModule(CausalLMSpec(model=make_tiny_llama(seed=5)))
    evaluator = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    reloaded = evaluator.test(fresh, datamodule=dm, ckpt_path=ckpt, verbose=False)[0]
    assert reloaded.keys() == in_memory.keys() == {"test/ppl/a", "test/ppl/b"}
    for key in in_memory:
        assert reloaded[key] == pytest.approx(in_memory[key], rel=1e-6)


class Drain(Callback):
    """Draws ``n`` numbers from the global generator when fit starts, before the compression stage runs: what a
    stage that draws more (or fewer) numbers than before would do to everything after it."""

    def __init__(self, n: int) -> None:
        self.n = n

    def setup(self, trainer, pl_module, stage):
        torch.rand(self.n)


def _recovered(tmp_path, drain: int, **lora) -> dict[str, torch.Tensor]:
    """The factors after svd_llm and 2 + 2 U/V LoRA steps with dropout (random masks) from random adapters."""
    module, stage = lora_module(steps=[2, 2], r=2, alpha=4, dropout=0.2, **lora)
    lora_trainer(tmp_path / f"run{drain}", [Drain(drain)]).fit(module, datamodule=OrderedTokens())
    return {k: v.clone() for k, v in module.model.state_dict().items() if k.endswith(("down.weight", "up.weight"))}


def test_recovery_does_not_depend_on_what_ran_before_it(tmp_path, monkeypatch):
    """The adapters' initial values and the training's dropout masks come from ``lora.seed`` (default: the run's
    seed, else 0): draws before the stage change nothing; another seed changes the result."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    base = _recovered(tmp_path, 0)
    drained = _recovered(tmp_path, 1000)
    assert base.keys() == drained.keys() and len(base) == 28
    assert all(torch.equal(base[k], drained[k]) for k in base)
    other = _recovered(tmp_path, 0, seed=3)
    assert sum(not torch.equal(base[k], other[k]) for k in base) == 28
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")  # what seed_everything(3) sets: the stage's default seed
    run_seed = _recovered(tmp_path, 17)
    assert all(torch.equal(other[k], run_seed[k]) for k in base)


class SaveAt(Callback):
    """Save a checkpoint after optimizer step ``step`` (mid-stage: the adapters are attached)."""

    def __init__(self, path, step: int) -> None:
        self.path, self.step, self.ppl = path, step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            loader = trainer.datamodule.test_dataloader()[0]
            self.ppl = pl_module.evaluate_loader(loader)["ppl"]


def test_mid_lora_checkpoint_evaluates_with_adapters_folded(tmp_path):
    dm = OrderedTokens()
    module, _ = lora_module(steps=[3, 3], r=2, alpha=4, dropout=0.0)
    saver = SaveAt(tmp_path / "mid.ckpt", step=5)
    lora_trainer(tmp_path, [saver]).fit(module, datamodule=dm)
    saved = torch.load(saver.path, weights_only=True)
    assert saved["uv_lora"]["scaling"] == 2.0 and any(".lora_B." in k for k in saved["state_dict"])
    fresh = CompressionModule(CausalLMSpec(model=make_tiny_llama(seed=3)))
    evaluator = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    out = evaluator.test(fresh, datamodule=dm, ckpt_path=saver.path, verbose=False)[0]
    assert out["test/ppl/a"] == pytest.approx(saver.ppl, rel=1e-5)


def test_fold_lora_state_dict_matches_the_adapted_layer():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=6, target_modules=["0"]), model)
    torch.nn.init.normal_(model[0].lora_B["default"].weight)
    x = torch.randn(3, 6)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fold_lora_state_dict_(state, scaling=3.0) == 1
    plain = torch.nn.Sequential(torch.nn.Linear(6, 5))
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(x), expected, rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_explained():
    for order in (["down", "down"], ["both"], ["both", "both", "up"], ["down", "left"]):
        with pytest.raises(ValueError, match="lora.order takes one entry per stage"):
            LoRARecipe(order=order, steps=2)
    assert LoRARecipe(order=["both", "up"], steps=2).order == ["both", "up"]
    with pytest.raises(ValueError, match="lora.steps or lora.epochs"):
        UVLoRA(LoRARecipe())
    with pytest.raises(ValueError, match="one value or one per stage"):
        LoRARecipe(steps=[1, 2, 3])
    with pytest.raises(ValueError, match="not both"):
        LoRARecipe(steps=1, epochs=1)
    with pytest.raises(ValueError, match="'constant' or 'cosine'"):
        LoRARecipe(steps=1, schedule="linear")
    with pytest.raises(ValueError, match="lora.warmup"):
        LoRARecipe(steps=1, schedule="cosine", warmup=1.0)
    with pytest.raises(ValueError, match="method is null"):
        Recipe(None, quantization={"rotate": True}, lora={"steps": 1})


# -- instruction finetuning data (data/instruct.py) -------------------------------------------------
RECORDS = [
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Repeat.", "input": "abc", "output": "abc abc"},
]


@pytest.fixture(params=["json", "jsonl"])
def alpaca_file(tmp_path, request):
    import json

    path = tmp_path / f"alpaca.{request.param}"
    if request.param == "json":
        path.write_text(json.dumps(RECORDS))
    else:
        path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return path


def test_alpaca_prompts_are_masked_exactly(alpaca_file):
    from data.instruct import IGNORE_INDEX, InstructionDataModule, alpaca_prompt
    from tests.test_llm_data import byte_tokenizer

    tok = byte_tokenizer()
    dm = InstructionDataModule(str(alpaca_file), tokenizer=tok, max_length=512, batch_size=3)
    assert alpaca_prompt(RECORDS[0]).endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert "### Input:\n2 and 3\n\n### Response:\n" in alpaca_prompt(RECORDS[1])
    assert "### Input" not in alpaca_prompt(RECORDS[0])
    batch = next(iter(dm._loader("train", batch_size=3)))  # unshuffled
    eos = tok.eos_token_id
    for i, record in enumerate(RECORDS):
        prompt = tok(alpaca_prompt(record))["input_ids"]
        response = tok(record["output"], add_special_tokens=False)["input_ids"] + [eos]
        n = len(prompt) + len(response)
        assert batch["input_ids"][i, :n].tolist() == prompt + response
        assert batch["labels"][i, :n].tolist() == [IGNORE_INDEX] * len(prompt) + response
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all() and (batch["input_ids"][i, n:] == eos).all()
    # the loss counts response tokens (and EOS) only
    model = make_tiny_llama()
    model.resize_token_embeddings(len(tok))
    _, count = CausalLMSpec._nll(model, batch)
    assert int(count) == sum(len(tok(r["output"], add_special_tokens=False)["input_ids"]) + 1 for r in RECORDS)


def test_alpaca_truncation_validation_split_and_calibration(tmp_path, alpaca_file):
    from data.instruct import IGNORE_INDEX, InstructionDataModule, alpaca_prompt
    from tests.test_llm_data import byte_tokenizer

    tok = byte_tokenizer()
    short = len(tok(alpaca_prompt(RECORDS[0]))["input_ids"])  # the shortest prompt
    dm = InstructionDataModule(str(alpaca_file), tokenizer=tok, max_length=short + 1)
    dm.setup("fit")
    train = dm._splits["train"]
    assert len(train) == 1  # the two prompts with an input section do not fit: dropped
    assert train[0]["input_ids"].numel() == short + 1 and train[0]["labels"].tolist()[-1] != IGNORE_INDEX
    assert train[0]["labels"].tolist()[:-1] == [IGNORE_INDEX] * short
    split = InstructionDataModule(str(alpaca_file), tokenizer=tok, val_size=1)
    assert len(split.train_dataloader().dataset) == 2 and len(split.val_dataloader().dataset) == 1
    calib = list(InstructionDataModule(str(alpaca_file), tokenizer=tok, calibration_samples=2).calibration_dataloader())
    assert len(calib) == 2 and all(b["attention_mask"].all() for b in calib)  # one example a batch: no padding
    with pytest.raises(ValueError, match="val_size"):
        InstructionDataModule(str(alpaca_file), tokenizer=tok, val_size=3).setup()
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "x"}]')
    with pytest.raises(ValueError, match="'instruction' and 'output'"):
        InstructionDataModule(str(bad), tokenizer=tok).setup()


# -- distillation from the dense model (lora.distill) -----------------------------------------------
def test_distillation_loss_is_the_token_mean_kl_and_zero_for_the_teacher(token_batches):
    import copy

    import torch.nn.functional as F

    spec = CausalLMSpec(model=make_tiny_llama())
    teacher = make_tiny_llama()
    ids = token_batches[0]["input_ids"]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["attention_mask"][0, :5] = 0  # left padding: those positions are not scored
    kd, task = spec.distillation_loss(copy.deepcopy(teacher), teacher, batch)
    assert float(kd) == pytest.approx(0.0, abs=1e-7)
    assert float(task) == pytest.approx(float(spec.training_loss(teacher, batch)), rel=1e-6)
    student = make_tiny_llama(seed=3)
    for temperature in (1.0, 2.0):
        kd, _ = spec.distillation_loss(student, teacher, batch, temperature)
        with torch.no_grad():
            kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            t = F.log_softmax(teacher(**kw).logits[:, :-1] / temperature, -1)
            s = F.log_softmax(student(**kw).logits[:, :-1] / temperature, -1)
        per_token = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
        mask = batch["attention_mask"][:, 1:].float()
        assert float(kd) == pytest.approx(float((per_token * mask).sum() / mask.sum()) * temperature**2, rel=1e-5)


class KLProbe(Callback):
    """The distillation loss on the first training batch before and after the LoRA stages."""

    def __init__(self) -> None:
        self.kl: list[float] = []

    def _probe(self, trainer, pl_module) -> None:
        batch = next(iter(trainer.datamodule.train_dataloader()))
        with torch.no_grad():
            self.kl.append(float(pl_module.spec.distillation_loss(pl_module.model, pl_module.teacher, batch)[0]))

    on_train_start = _probe
    on_train_end = _probe


def test_lora_by_distillation_moves_the_student_towards_the_dense_model(tmp_path):
    module, _ = lora_module(learning_rate=5e-3, steps=[8, 8], r=4, alpha=8, dropout=0.0, distill=1.0)
    probe = KLProbe()
    lora_trainer(tmp_path, [probe]).fit(module, datamodule=OrderedTokens())
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert not any(k.startswith("teacher") for k in module.state_dict())  # never in checkpoints
    assert probe.kl[1] < 0.5 * probe.kl[0]  # the compressed model's KL to the dense one falls


def test_distillation_is_refused_for_a_family_without_it(tmp_path):
    from lightning_modules import VGGTSpec

    recipe = Recipe("svd", ratio=0.3, lora={"steps": 1, "distill": 0.5})
    module = CompressionModule(VGGTSpec(config_overrides={"frames_chunk_size": None}), compression=recipe)
    with pytest.raises(ValueError, match="VGGTSpec does not define"):
        lora_trainer(tmp_path).fit(module, datamodule=OrderedTokens())
    with pytest.raises(ValueError, match="lora.distill is a weight in"):
        LoRARecipe(steps=1, distill=1.5)


def test_bf16_autocast_trains_in_bf16_and_keeps_float32_factors(tmp_path):
    """``lora.autocast: bfloat16``: the same recovery as float32 up to bf16 rounding, factors stay float32."""
    runs = {}
    for autocast in (None, "bfloat16"):
        module, _ = lora_module(learning_rate=5e-3, steps=[4, 4], r=4, alpha=8, dropout=0.0, distill=1.0,
                                autocast=autocast)
        probe, rec = KLProbe(), Recorder()
        lora_trainer(tmp_path, [probe, rec]).fit(module, datamodule=OrderedTokens())
        assert {p.dtype for p in module.model.parameters()} == {torch.float32}
        assert probe.kl[1] < 0.7 * probe.kl[0]  # it still recovers
        runs[autocast] = (probe_logits(module), rec.losses)
    (ref, ref_losses), (bf16, bf16_losses) = runs[None], runs["bfloat16"]
    # bf16 matmuls really ran (the losses differ), and the result is float32's up to their rounding
    assert ref_losses != bf16_losses
    assert bf16_losses == pytest.approx(ref_losses, rel=0.05)
    assert float((bf16 - ref).abs().max()) < 0.05 * float(ref.abs().max())
    with pytest.raises(ValueError, match="lora.autocast takes 'bfloat16' or null"):
        LoRARecipe(steps=1, autocast="float16")
