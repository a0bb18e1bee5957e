"""What buys general-domain quality at equal parameters: calibration mix, allocation, whitening shrinkage.

    python benchmarks/llm_general.py --out docs/results/llm_general.md

Every row compresses SmolLM2-135M through the recipe entry point (:class:`compression.Recipe` +
:func:`compression.compress_`) and scores it on the held-out domains of :mod:`data.domains`
(``DOMAIN_TESTS``: drama, encyclopedia, scripture, dictionary, dialogue, manual, code), reporting
each domain's perplexity over the dense model's and their geometric mean.  The settings are chosen
on the ``DOMAIN_VALIDATION`` splits (short windows, ``--val-tokens`` per domain) and only the rows
marked ``test`` are scored on the test splits (``--eval-tokens`` per domain, 8192 by default).

Cheap by construction (2 shared CPU cores): statistics are Gram sums, so they are collected once
per group of corpora and combined (:func:`compression.stats.combine_stats`) into every mix:

- ``A1`` / ``A2``: two disjoint draws of 16 windows each of Shakespeare comedies and of ``wiki:calib``;
  ``default`` = A1 + A2 (the demo's calibration, 64 windows), ``default-32`` = A1 alone (size);
- ``O``: 16 windows of each of the five other corpora' ``calib`` splits (kjv, gcide, chatterbot,
  pydoc, pycode); ``broad`` = A1 + O (16 windows of each of 7 corpora, 112), ``broad-144`` = A1 + A2 + O;
- ``O2``: a second draw of O; ``broad-224`` = A1 + A2 + O + O2 (32 windows of each of the 7 corpora: size);
- ``L`` (``--long``): ``broad`` again as 4 windows of 1024 tokens per corpus (the same token count).

Rows with an output Fisher (``calibration.output_fisher``) take its sums once per mix from the dense model's
backward passes over the same gradient windows, four windows to a pass.

The gradient importances (``allocation: gradient``) are computed once per (statistics, method)
pair from ``--grad-samples`` single windows spread over that mix.  Results accumulate in a JSON
state file (``--state``), so rows can be run in several sessions; ``--render`` only writes the
markdown.  Recovery rows (U/V LoRA) come from ``train.py`` runs: ``--recovered NAME=0.2=PATH/summary.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import common  # before torch: passive OpenMP waiting, the repository on sys.path
import torch
import yaml
from common import perplexity

from compression import Recipe, build_method, collect_stats, compress_, gradient_importance
from compression.gradient_allocation import lm_loss
from compression.output_fisher import OutputWeighted, output_fisher
from compression.stats import combine_stats
from data.domains import DOMAIN_TESTS, DOMAIN_VALIDATION
from data.text import TextDataModule, random_windows
from lightning_modules.specs import CausalLMSpec

log = logging.getLogger("llm_general")
OTHERS = ("kjv:calib", "gcide:calib", "chatterbot:calib", "pydoc:calib", "pycode:calib")
DEFAULT_PAIR = ("shakespeare:comedies", "wiki:calib")
NOTES = "## Reading"
MIXES = {"default": ("A1", "A2"), "default-32": ("A1",), "broad": ("A1", "O"), "broad-144": ("A1", "A2", "O"),
         "broad-224": ("A1", "A2", "O", "O2"), "broad-long": ("L",)}


@dataclass(frozen=True)
class Row:
    """One compression: a calibration mix, an allocation, the method's arguments, a ratio."""

    name: str
    ratio: float
    mix: str = "broad"
    allocation: str = "uniform"
    shrinkage: float = 0.0
    test: bool = False  # also scored on the test splits
    grad_batches: int | None = None  # gradient windows as train.py picks them: this many batches of 4 (else spread)
    break_even: bool = False  # Recipe.dense_above_break_even
    sequential: bool = False  # calibration.mode: sequential, propagate: compressed (ranks from the dense model)
    dense_targets: bool = False  # sequential only: calibration.dense_targets (fit to the dense model's outputs)
    correct_dense: bool = False  # with dense_targets: calibration.correct_dense (kept-dense matrices corrected too)
    target_alpha: float = 1.0  # with dense_targets: calibration.target_alpha (the target X_c + α (X_d - X_c))
    staged: bool = False  # sequential only: calibration.staged (each block's layer groups on the compressed inputs)
    output_fisher: float | None = None  # calibration.output_fisher: output rows weighted, damping λ
    fisher_full: bool = False  # calibration.output_fisher_full: the whole output-gradient covariance
    grad_samples: int | None = None  # gradient / Fisher windows spread over the mix (None: --grad-samples)

    def __post_init__(self) -> None:
        if self.allocation not in ("gradient", "kfac") and (self.grad_batches is not None or self.break_even
                                                            or self.output_fisher is not None):
            raise ValueError(f"row {self.name!r}: grad_batches / break_even / output_fisher apply to allocations "
                             "'gradient' and 'kfac' only (the Fisher is taken on the gradient windows)")
        if self.allocation == "kfac" and self.output_fisher is None:
            raise ValueError(f"row {self.name!r}: allocation 'kfac' ranks by the output Fisher: set output_fisher")
        if (self.dense_targets or self.correct_dense or self.target_alpha != 1.0 or self.staged) \
                and not self.sequential:
            raise ValueError(f"row {self.name!r}: dense_targets / correct_dense / staged apply to the sequential rows "
                             "only")
        if self.sequential and self.mix == "broad-long":
            raise ValueError(f"row {self.name!r}: the sequential rows use the 256-token broad windows")

    @property
    def key(self) -> str:
        return f"{self.name}@{self.ratio:g}"

    def recipe(self, targets: list[str]) -> Recipe:
        args = {"shrinkage": self.shrinkage} if self.shrinkage else {}
        calibration = {"progress": False, **({"mode": "sequential", "propagate": "compressed"} if self.sequential
                                             else {}), **({"dense_targets": True} if self.dense_targets else {}),
                       **({"correct_dense": True} if self.correct_dense else {}),
                       **({"target_alpha": self.target_alpha} if self.target_alpha != 1.0 else {}),
                       **({"staged": True} if self.staged else {}),
                       **({"output_fisher": self.output_fisher} if self.output_fisher is not None else {}),
                       **({"output_fisher_full": True} if self.fisher_full else {})}
        return Recipe("svd_llm", method_args=args, ratio=self.ratio, targets=targets, allocation=self.allocation,
                      dense_above_break_even=self.break_even, calibration=calibration)


def plan(ratios: list[float], shrinkages: list[float], long: bool) -> list[Row]:
    """The study: each ingredient alone against the default, then combined (picked on validation)."""
    rows: list[Row] = []
    for ratio in ratios:
        rows += [Row("default (today)", ratio, "default", test=True),
                 Row("default-32 (half the windows)", ratio, "default-32"),
                 Row("broad mix", ratio, "broad", test=True),
                 Row("broad-144 (more windows)", ratio, "broad-144"),
                 Row("broad-224 (twice the windows)", ratio, "broad-224"),
                 Row("default + gradient", ratio, "default", "gradient", test=True),
                 Row("broad + v2", ratio, "broad", "v2"),
                 Row("broad + gradient", ratio, "broad", "gradient", test=True)]
        if long:
            rows.append(Row("broad, 1024-token windows", ratio, "broad-long"))
        rows += [Row(f"broad + shrinkage {lam:g}", ratio, "broad", shrinkage=lam) for lam in shrinkages]
        # issue-18 probes of the preset's gradient stage: train.py's pick (calibration.gradient_batches batches of
        # 4 consecutive windows; 4 reach only 4 of the 7 corpora, 7 reach all) and dense_above_break_even
        rows += [Row("broad + gradient, 4 batches (as the preset)", ratio, "broad", "gradient", grad_batches=4),
                 Row("broad + gradient, 7 batches", ratio, "broad", "gradient", grad_batches=7),
                 Row("broad + gradient, dense above break-even", ratio, "broad", "gradient", test=True,
                     break_even=True),
                 # sequential calibration with error propagation at the same (dense-model gradient) ranks;
                 # scored on test only with --test, once validation prefers it
                 Row("broad + gradient, dense above break-even, sequential", ratio, "broad", "gradient",
                     break_even=True, sequential=True),
                 # the same with dense targets: each layer fitted to the dense model's output (asymmetric calibration)
                 Row("broad + gradient, dense above break-even, sequential, dense targets", ratio, "broad", "gradient",
                     break_even=True, sequential=True, dense_targets=True),
                 # and the matrices kept dense corrected to their full-rank least-squares weights (same parameters)
                 Row("broad + gradient, dense above break-even, sequential, dense targets, corrected dense", ratio,
                     "broad", "gradient", break_even=True, sequential=True, dense_targets=True, correct_dense=True)]
        # the target only part of the way to the dense model's (QEP's propagation strength α)
        rows += [Row(f"broad + gradient, dense above break-even, sequential, dense targets α={alpha:g}", ratio, "broad",
                     "gradient", break_even=True, sequential=True, dense_targets=True, target_alpha=alpha)
                 for alpha in (0.25, 0.5)]
        # staged within each block: o / gate,up / down calibrated through the block's compressed earlier layers
        rows += [Row("broad + gradient, dense above break-even, sequential, staged" + (", dense targets" if dt else ""),
                     ratio, "broad", "gradient", break_even=True, sequential=True, staged=True, dense_targets=dt)
                 for dt in (False, True)]
        # output rows weighted by the dense model's squared loss gradients (FWSVD on the whitening), damping λ
        rows += [Row(f"broad + gradient, dense above break-even{', sequential' * seq}, output Fisher λ={lam:g}", ratio,
                     "broad", "gradient", break_even=True, sequential=seq, output_fisher=lam)
                 for seq in (False, True) for lam in (0.5, 0.1, 0.02)]
        rows += [Row(f"broad + gradient, dense above break-even{', sequential' * seq}, full output Fisher λ={lam:g}",
                     ratio, "broad", "gradient", break_even=True, sequential=seq, output_fisher=lam, fisher_full=True)
                 for seq in (False, True) for lam in (0.5, 0.1)]
        # the ranks from the same Fisher: every triplet by its Kronecker-factored loss, no gradient importance
        rows += [Row(f"broad + K-FAC allocation, dense above break-even{', sequential' * seq}, output Fisher λ={lam:g}",
                     ratio, "broad", "kfac", break_even=True, sequential=seq, output_fisher=lam)
                 for seq in (False, True) for lam in (0.1, 0.02)]
        rows += [Row(f"broad + K-FAC allocation, dense above break-even{', sequential' * seq}, output Fisher λ=0.1 "
                     "from 64 windows", ratio, "broad", "kfac", break_even=True, sequential=seq, output_fisher=0.1,
                     grad_samples=64) for seq in (False, True)]
        # calibration size and window length on the 0.2 preset's compression (its Fisher and gradient tokens kept:
        # 16 windows of 256 tokens, or 4 of 1024)
        rows += [Row("broad-224 + gradient, dense above break-even, output Fisher λ=0.1", ratio, "broad-224",
                     "gradient", break_even=True, output_fisher=0.1),
                 Row("broad, 1024-token windows + gradient, dense above break-even, output Fisher λ=0.1", ratio,
                     "broad-long", "gradient", break_even=True, output_fisher=0.1, grad_samples=4)]
    return rows


def _windows(dm: TextDataModule, source: str, count: int, seq_len: int, seed: int) -> torch.Tensor:
    return random_windows(dm.tokens(source), seq_len, count, torch.Generator().manual_seed(seed))


class Study:
    def __init__(self, args) -> None:
        from models.causal_lm import load_causal_lm

        self.args = args
        self.model, tokenizer = load_causal_lm(args.model)
        self.model.eval()
        self.spec = CausalLMSpec(model=self.model)
        self.targets = self.spec.default_targets(self.model)
        self.tokens = TextDataModule(tokenizer=tokenizer, seq_len=args.seq_len, calibration_samples=1,
                                     test=DOMAIN_TESTS, eval_max_tokens=args.eval_tokens)
        self.dms = {"test": self.tokens,
                    "val": TextDataModule(tokenizer=tokenizer, seq_len=args.seq_len, calibration_samples=1,
                                          test=DOMAIN_VALIDATION, eval_max_tokens=args.val_tokens)}
        self.loaders: dict[str, dict] = {}
        self.parts: dict[str, tuple] = {}  # part -> (stats, windows, seconds)
        self.importances: dict[tuple, tuple] = {}
        self.fishers: dict[tuple, tuple] = {}

    def split(self, split: str) -> dict:
        if split not in self.loaders:
            dm = self.dms[split]
            dm.setup("test")
            self.loaders[split] = dict(zip(dm.test_names, dm.test_dataloader()))
        return self.loaders[split]

    def score(self, model, split: str) -> dict[str, float]:
        return {name: perplexity(model, loader) for name, loader in self.split(split).items()}

    # -- statistics ---------------------------------------------------------------------------------
    def part(self, name: str):
        if name in self.parts:
            return self.parts[name]
        n, seq, seed = self.args.windows, self.args.seq_len, self.args.seed
        sources = {"A1": DEFAULT_PAIR, "A2": DEFAULT_PAIR, "O": OTHERS, "O2": OTHERS, "L": DEFAULT_PAIR + OTHERS}[name]
        if name == "L":
            n, seq = max(1, n * seq // self.args.long_len), self.args.long_len
        offset = {"A1": 0, "A2": 1000, "O": 0, "O2": 1000, "L": 2000}[name]
        windows = torch.cat([_windows(self.tokens, s, n, seq, seed + offset + i) for i, s in enumerate(sources)])
        start = time.perf_counter()
        batches = [{"input_ids": w} for w in windows.split(4)]
        stats = collect_stats(self.model, self.targets, batches, forward=self.spec.calibration_forward,
                              needs={"gram"})
        self.parts[name] = (stats, windows, time.perf_counter() - start)
        log.warning("statistics %s: %d x %d tokens in %.0f s", name, windows.shape[0], seq, self.parts[name][2])
        return self.parts[name]

    def mix(self, mix: str):
        parts = [self.part(p) for p in MIXES[mix]]
        stats = parts[0][0] if len(parts) == 1 else combine_stats(*(p[0] for p in parts))
        return stats, torch.cat([p[1] for p in parts]), sum(p[2] for p in parts)

    def picks(self, row: Row, windows) -> list[torch.Tensor]:
        """The gradient windows of a row (and of its output Fisher)."""
        if row.grad_batches is None:
            return common.spread(list(windows), row.grad_samples or self.args.grad_samples)
        # as train.py: whole calibration batches of 4 windows, evenly spaced, split into single windows
        return [w for b in common.spread(list(windows.split(4)), row.grad_batches) for w in b]

    def fisher(self, row: Row, windows) -> tuple[dict | None, float]:
        """The dense model's output Fisher sums on the row's gradient windows, 4 to a backward."""
        if row.output_fisher is None:
            return None, 0.0
        key = (row.mix, row.grad_batches, row.grad_samples, row.fisher_full)
        if key not in self.fishers:
            picks, start = self.picks(row, windows), time.perf_counter()
            sums, _ = output_fisher(self.model, self.targets,
                                    [{"input_ids": torch.stack(picks[i:i + 4])} for i in range(0, len(picks), 4)],
                                    lm_loss, full=row.fisher_full)
            self.fishers[key] = (sums, time.perf_counter() - start)
        return self.fishers[key]

    def importance(self, row: Row, stats, windows) -> tuple[dict, float]:
        key = (row.mix, row.shrinkage, row.grad_batches, row.grad_samples, row.output_fisher, row.fisher_full)
        if key not in self.importances:
            fisher, fisher_s = self.fisher(row, windows)
            start = time.perf_counter()
            method = build_method("svd_llm", **({"shrinkage": row.shrinkage} if row.shrinkage else {}))
            if fisher is not None:
                method = OutputWeighted(method, fisher, row.output_fisher)
            singles = [{"input_ids": w[None]} for w in self.picks(row, windows)]
            imp = gradient_importance(self.model, self.targets, singles, lm_loss, method, stats)
            self.importances[key] = (imp, fisher_s + time.perf_counter() - start)
        return self.importances[key]

    def run(self, row: Row) -> dict:
        stats, windows, calib_s = self.mix(row.mix)
        importances, grad_s = (self.importance(row, stats, windows) if row.allocation == "gradient" else (None, 0.0))
        fisher, fisher_s = self.fisher(row, windows)
        if row.allocation != "gradient":  # a gradient row's importance time counts its Fisher already
            grad_s += fisher_s
        model = copy.deepcopy(self.model)
        start = time.perf_counter()
        if row.sequential:  # the mix's windows again, block by block; the importances are the dense model's
            batches = [{"input_ids": w} for w in windows.split(4)]
            report = compress_(model, row.recipe(self.targets), family=CausalLMSpec(model=model), batches=batches,
                               importances=importances, fisher=fisher)
        else:
            report = compress_(model, row.recipe(self.targets), stats, importances=importances, fisher=fisher)
        out = {"row": row.name, "ratio": row.ratio, "mix": row.mix, "allocation": row.allocation,
               "shrinkage": row.shrinkage, "grad_batches": row.grad_batches, "break_even": row.break_even,
               "sequential": row.sequential, "dense_targets": row.dense_targets,
               "correct_dense": row.correct_dense, "target_alpha": row.target_alpha,
               "staged": row.staged, "output_fisher": row.output_fisher, "fisher_full": row.fisher_full,
               "grad_samples": row.grad_samples,
               "params": sum(p.numel() for p in model.parameters()),
               "removed": report.params_ratio, "calibration_s": calib_s, "gradient_s": grad_s,
               "decomposition_s": time.perf_counter() - start}
        if row.staged:  # forwards per calibration batch grow with the stages (kept-dense groups merge)
            out["block_stages"] = [r.get("stages", 0) for r in report.blocks]
        out["val"] = self.score(model, "val")
        if row.test:
            out["test"] = self.score(model, "test")
        del model
        return out


def geomean(ppl: dict[str, float], dense: dict[str, float]) -> float:
    return math.exp(sum(math.log(ppl[k] / dense[k]) for k in dense) / len(dense))


def load_state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}, "dense": {}}


def render(state: dict, args, recovered: dict[str, dict]) -> str:
    dense = state["dense"]
    domains = list(DOMAIN_TESTS)
    # what a recovery row's dense validation must be: one perplexity over the same windows of every domain
    dense_val = math.exp(sum(math.log(v) for v in dense["val"].values()) / len(dense["val"])) if dense.get("val") else 0
    commands = list(dict.fromkeys(r["command"] for r in state["rows"].values()))
    lines = ["# General-domain quality of SmolLM2-135M after compression", "",
             "Commands of the rows without recovery (column `cmd`; a row is computed once and kept in the "
             "`--state` file, so later commands add rows):", "",
             *[f"{i}. `{c}`" for i, c in enumerate(commands, start=1)], "",
             f"Method `svd_llm` everywhere; test: {args.eval_tokens} tokens per held-out domain "
             f"(`data.domains.DOMAIN_TESTS`), validation: {args.val_tokens} tokens per domain "
             "(`DOMAIN_VALIDATION`), windows of 256 tokens. Cells: perplexity / dense perplexity "
             "(lower is better); `gmean` = geometric mean over the seven domains. `params`: the whole model's "
             "parameters. `time`: calibration + output Fisher + gradient importance + decomposition seconds for "
             "that row on 2 shared CPU cores (statistics shared between rows were collected once; the time counts "
             "them for every row that uses them).", ""]
    if dense.get("test"):
        lines += ["Dense perplexity: " + ", ".join(f"{d} {dense['test'][d]:.2f}" for d in domains)
                  + f"; {dense['params']:,} parameters.", ""]
    for ratio in sorted({r["ratio"] for r in state["rows"].values()}):
        rows = [r for r in state["rows"].values() if r["ratio"] == ratio]
        lines += [f"## Ratio {ratio:g} (fraction of the targeted decoder parameters removed)", "",
                  "| row | val gmean | " + " | ".join(domains) + " | test gmean | params | time s | cmd |",
                  "|---|---:|" + "---:|" * len(domains) + "---:|---:|---:|---:|"]
        for r in rows:
            val = f"{geomean(r['val'], dense['val']):.3f}"
            seconds = r["calibration_s"] + r["gradient_s"] + r["decomposition_s"]
            if "test" in r:
                cells = " | ".join(f"{r['test'][d] / dense['test'][d]:.2f}" for d in domains)
                gm = f"**{geomean(r['test'], dense['test']):.3f}**"
            else:
                cells, gm = " | ".join("" for _ in domains), "(val only)"
            lines.append(f"| {r['row']} | {val} | {cells} | {gm} | {r['params']:,} | {seconds:.0f} "
                         f"| {commands.index(r['command']) + 1} |")
        for name, summary in recovered.items():
            if abs(summary["ratio"] - ratio) > 1e-9:
                continue
            test = {d: summary["test"][d] for d in domains}
            cells = " | ".join(f"{test[d] / dense['test'][d]:.2f}" for d in domains)
            val = f"{summary['val']:.3f}" if summary.get("val") else "-"
            if summary.get("val") and abs(summary["dense_val"] / dense_val - 1) > 1e-4:
                raise ValueError(f"{name}: the run's dense validation perplexity {summary['dense_val']:.4f} is not the "
                                 f"geometric mean of this state's ({dense_val:.4f}): not the same validation windows")
            lines.append(f"| {name} | {val} | {cells} | **{geomean(test, dense['test']):.3f}** | {summary['params']:,} "
                         f"| {summary['seconds']:.0f} | train.py |")
        lines.append("")
    return "\n".join(lines) + "\n"


def read_recovered(specs: list[str], val_tokens: int, seq_len: int) -> dict[str, dict]:
    """``NAME=RATIO=PATH`` -> a row from a ``train.py`` run's ``summary.json`` (``test/ppl/<domain>`` keys), with
    its validation ratio when the run's ``config.yaml`` (next to it) validated on the ``DOMAIN_VALIDATION``
    corpora, ``val_tokens`` each (as configs/llm/best.yaml does): then it is this table's ``val gmean``."""
    out = {}
    for spec in specs:
        name, ratio, path = spec.split("=", 2)
        summary = json.loads(Path(path).read_text())
        test = {k.split("/")[2]: v for k, v in summary["test"].items() if k.startswith("test/ppl/")}
        missing = sorted(set(DOMAIN_TESTS) - set(test))
        if missing:
            raise ValueError(f"{path}: the run scored no {missing}; use a config whose data.test is DOMAIN_TESTS")
        out[name] = {"ratio": float(ratio), "test": test, "params": summary["compression"]["model_params_after"],
                     "seconds": summary["wall_seconds"]}
        val, dense_val = summary.get("validation", {}).get("val/ppl"), summary.get("dense_validation", {}).get("ppl")
        config = Path(path).parent / "config.yaml"
        data = yaml.safe_load(config.read_text()).get("data", {}).get("init_args", {}) if config.is_file() else {}
        same = (data.get("validation") == list(DOMAIN_VALIDATION.values()) and data.get("val_max_tokens") == val_tokens
                and data.get("seq_len") == seq_len)
        if val and dense_val and same:  # one perplexity over equal tokens of each domain: their geometric mean
            out[name].update(val=val / dense_val, dense_val=dense_val)
    return out


def main() -> None:
    p = common.lm_parser(__doc__, calib_samples=16)
    p.add_argument("--windows", type=int, default=16, help="calibration windows per corpus and draw")
    p.add_argument("--val-tokens", type=int, default=1024, help="tokens per validation domain")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--shrinkages", type=float, nargs="*", default=[0.01, 0.05, 0.2])
    p.add_argument("--long", action="store_true", help="add the 1024-token-window calibration row")
    p.add_argument("--long-len", type=int, default=1024)
    p.add_argument("--grad-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="row keys (name@ratio) or extra rows "
                   "'name@ratio:mix:allocation:shrinkage[:test]' to run; default: the whole plan")
    p.add_argument("--test", nargs="*", default=[], help="row keys to score on the test splits too (a row "
                   "the plan scores on validation only, once validation prefers it)")
    p.add_argument("--budget-min", type=float, default=None,
                   help="start no new row after this many minutes (the rows are run in the order given)")
    p.add_argument("--state", type=Path, default=Path("/tmp/llm_general.json"))
    p.add_argument("--render", action="store_true", help="only write the markdown from --state")
    p.add_argument("--recovered", nargs="*", default=[], help="NAME=RATIO=summary.json of train.py runs")
    args = p.parse_args()
    t0 = time.perf_counter()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    state = load_state(args.state)
    command = "python benchmarks/llm_general.py " + " ".join(
        f"'{a}'" if " " in a or "(" in a else a for a in sys.argv[1:])
    if not args.render:
        study = Study(args)
        if not state["dense"]:
            start = time.perf_counter()
            state["dense"] = {"val": study.score(study.model, "val"), "test": study.score(study.model, "test"),
                              "params": sum(p.numel() for p in study.model.parameters())}
            log.warning("dense: %s (%.0f s)", state["dense"], time.perf_counter() - start)
            args.state.write_text(json.dumps(state, indent=1))
        rows = {r.key: r for r in plan(args.ratios, args.shrinkages, args.long)}
        for spec in args.only or []:
            if ":" in spec:
                name_ratio, mix, alloc, lam, *flag = spec.split(":")
                name, ratio = name_ratio.rsplit("@", 1)
                row = Row(name, float(ratio), mix, alloc, float(lam), test=bool(flag))
                rows[row.key] = row
        for key in args.test:
            if key not in rows:
                raise SystemExit(f"--test {key!r}: no such row; the plan's rows: {sorted(rows)}")
            rows[key] = dataclasses.replace(rows[key], test=True)
        keys = [k.split(":")[0] for k in args.only] if args.only else list(rows)
        for key in keys:
            if args.budget_min is not None and time.perf_counter() - t0 > 60 * args.budget_min:
                log.warning("--budget-min %g reached: %s and later rows not run", args.budget_min, key)
                break
            row = rows[key]
            done = state["rows"].get(key)
            if done is not None and (not row.test or "test" in done):
                continue
            result = study.run(row)
            result["command"] = command
            state["rows"][key] = result
            args.state.write_text(json.dumps(state, indent=1))
            log.warning("%s: val gmean %.3f%s", key, geomean(result["val"], state["dense"]["val"]),
                        f", test gmean {geomean(result['test'], state['dense']['test']):.3f}" if "test" in result
                        else "")
    text = render(state, args, read_recovered(args.recovered, args.val_tokens, args.seq_len))
    print(text)
    if args.out:
        common.write_keeping_notes(args.out, text, NOTES)
        args.out.with_suffix(".json").write_text(json.dumps(state, indent=1))


if __name__ == "__main__":
    main()
