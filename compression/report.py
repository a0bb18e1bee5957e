"""What a compression run did, layer by layer, with the real parameter counts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class LayerReport:
    """One factorized layer.  ``truncation_loss = sqrt(Σ dropped σ²)`` in the method's space
    (for ``svd_llm``/``svd_llm_v2`` the calibration output error ``‖(W-W')Xᵀ‖_F``)."""

    name: str
    out_features: int
    in_features: int
    rank: int
    params_before: int
    params_after: int
    ratio_assigned: float
    truncation_loss: float
    relative_loss: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


@dataclass
class CompressionReport:
    method: str
    allocation: str
    ratio: float
    layers: list[LayerReport]
    model_params_before: int
    model_params_after: int
    plan: dict
    skipped: dict[str, str] = field(default_factory=dict)
    kept_dense_params: int = 0  # parameters of the targeted matrices the allocation kept dense (not in ``layers``)
    seconds: float = 0.0
    blocks: list[dict] = field(default_factory=list)  # calibration.mode: sequential, one record per block

    @property
    def targeted_params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def targeted_params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def kept_dense(self) -> list[str]:
        """The targeted matrices the allocation kept dense (their ``skipped`` reason says so)."""
        return [key for key, why in self.skipped.items() if why.startswith("kept dense")]

    @property
    def params_ratio(self) -> float:
        """Measured fraction of the factorized layers' parameters removed (a matrix the allocation kept dense is not
        among them: :attr:`targets_ratio` is the fraction of all the targets', what ``ratio`` asks for)."""
        before = self.targeted_params_before
        return 1.0 - self.targeted_params_after / before if before else 0.0

    @property
    def targets_ratio(self) -> float:
        """Measured fraction removed of all the targeted matrices' parameters, the ones kept dense included: the
        figure the asked ``ratio`` aims at."""
        before = self.targeted_params_before + self.kept_dense_params
        return 1.0 - (self.targeted_params_after + self.kept_dense_params) / before if before else 0.0

    @property
    def uncovered_params(self) -> int:
        """Parameters of the weight matrices this run did not cover (listed in ``skipped`` with their counts)."""
        return sum(int(r.rsplit("[", 1)[1].split()[0].replace(",", "")) for r in self.skipped.values()
                   if r.endswith(" parameters]"))

    @property
    def model_params_ratio(self) -> float:
        """Measured fraction of the whole model's parameters removed."""
        return 1.0 - self.model_params_after / self.model_params_before

    def summary(self) -> dict[str, float | int | str]:
        return {
            "method": self.method,
            "allocation": self.allocation,
            "ratio_asked": self.ratio,
            "layers": len(self.layers),
            "targeted_params_before": self.targeted_params_before,
            "targeted_params_after": self.targeted_params_after,
            "params_ratio": self.params_ratio,
            "kept_dense": len(self.kept_dense),
            "kept_dense_params": self.kept_dense_params,
            "targets_ratio": self.targets_ratio,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "model_params_ratio": self.model_params_ratio,
            "seconds": self.seconds,
        }

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "layers": [dataclasses.asdict(r) for r in self.layers],
            "skipped": dict(self.skipped),
            "plan": self.plan,
        }

    def to_table(self, max_rows: int | None = None) -> str:
        """A fixed-width text table (also logged to TensorBoard as text)."""
        rows = self.layers if max_rows is None else self.layers[:max_rows]
        width = max([len(r.name) for r in rows] + [5])
        lines = [f"{'layer':<{width}}  {'shape':>11}  {'rank':>5}  {'params':>17}  {'ratio':>6}  {'rel.loss':>8}"]
        for r in rows:
            shape = f"{r.out_features}x{r.in_features}"
            params = f"{r.params_before}->{r.params_after}"
            lines.append(
                f"{r.name:<{width}}  {shape:>11}  {r.rank:>5}  {params:>17}  "
                f"{1 - r.params_after / r.params_before:>6.3f}  {r.relative_loss:>8.4f}"
            )
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"... {len(self.layers) - max_rows} more layers")
        uncovered = [(n, r) for n, r in self.skipped.items() if r.endswith(" parameters]")]
        if uncovered:
            total = sum(int(r.rsplit("[", 1)[1].split()[0].replace(",", "")) for _, r in uncovered)
            lines.append(f"not covered: {len(uncovered)} weight matrices, {total:,} parameters "
                         f"({total / max(self.model_params_before, 1):.1%} of the model):")
            shown = uncovered if max_rows is None else uncovered[:max(max_rows, 6)]
            lines += [f"  {n}: {r}" for n, r in shown]
            if len(shown) < len(uncovered):
                lines.append(f"  ... {len(uncovered) - len(shown)} more")
        s = self.summary()
        kept = (f" ({s['targets_ratio']:.4f} of {s['targeted_params_before'] + self.kept_dense_params:,} with the "
                f"{s['kept_dense']} matrices kept dense)" if self.kept_dense_params else "")
        lines.append(
            f"{self.method} / {self.allocation}: asked ratio {self.ratio:.3f}, removed {s['params_ratio']:.4f} of "
            f"{s['targeted_params_before']:,} factorized parameters{kept}; model {s['model_params_before']:,} -> "
            f"{s['model_params_after']:,} ({s['model_params_ratio']:.4f} removed) in {self.seconds:.1f} s"
        )
        return "\n".join(lines)


def merge_reports(first: CompressionReport, *rest: CompressionReport) -> CompressionReport:
    """One report for consecutive compression steps on the same model (e.g. joint q/k/v, then the
    other layers per matrix): layers concatenated, parameters from before the first to after the
    last step, plans merged (:func:`compression.plan.merge_plans`)."""
    from compression.plan import merge_plans

    reports = (first, *rest)
    last = reports[-1]
    return CompressionReport(
        method=last.method, allocation=last.allocation, ratio=last.ratio,
        layers=[layer for r in reports for layer in r.layers],
        model_params_before=first.model_params_before, model_params_after=last.model_params_after,
        plan=merge_plans(*(r.plan for r in reports)),
        skipped={k: v for r in reports for k, v in r.skipped.items()},
        kept_dense_params=sum(r.kept_dense_params for r in reports), seconds=sum(r.seconds for r in reports))
