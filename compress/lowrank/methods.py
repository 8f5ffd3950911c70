"""`svd` and `fwsvd`: factorize Linear/Conv2d layers into low-rank pairs (compress lowrank MODEL --method ...).

Flow (the same for both): probe the layers (shapes, which one reads the input / writes the output) ▸ for
FWSVD, the per-weight Fisher from per-sample gradients ▸ one (weighted) SVD per eligible layer ▸ the
per-layer plan from the rank rule, printed as a table ▸ (unless dry_run) replace the layers with
`Factorized` pairs, record a `lowrank` structure edit, optionally fine-tune with distillation from the
unfactorized model (compress.finetune, shared with pruning).
"""
from __future__ import annotations

import copy
import inspect
import time
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch.nn as nn

from compress.errors import UserError
from compress.io import LoadedModel
from compress.lowrank import METHODS
from compress.lowrank.factorize import factorize_layer, set_submodule
from compress.lowrank.fisher import FISHER_SOURCES, fisher_from_source
from compress.lowrank.plan import BUDGET_RULES, Plan, _splits, candidates, make_plan, plan_table, probe
from compress.metrics import count_flops, count_params
from compress.progress import log, status
from compress.stages import Context, Method, MethodConfig, option

RULES = ("ratio", "energy", "params", "flops", "latency")


@dataclass
class LowRankConfig(MethodConfig):
    rank_rule: str = option("ratio", "how ranks are chosen: one global rank ratio (the paper's rule), a per-layer "
                            "energy threshold, or a whole-model params/FLOPs budget allocated across layers "
                            "('latency': a budget of the convs' measured ORT time; implies latency_aware)",
                            choices=RULES)
    ratio: float = option(0.33, "rank ratio r / min(N, M) for every layer (rank_rule ratio; the paper keeps 33%)")
    energy: float = option(0.9, "fraction of each layer's (Fisher-weighted) spectral energy to keep (rank_rule energy)")
    budget: float = option(0.5, "fraction of the whole model's params, FLOPs or predicted conv time to keep "
                           "(rank_rule params|flops|latency)")
    conv_split: str = option("channel", "k×k conv into k×k (rank r) + 1×1 ('channel') or k×1 + 1×k ('spatial')",
                             choices=("channel", "spatial"))
    latency_aware: bool = option(False, "price each conv's dense form and its channel/spatial splits by measured "
                                 "ONNX Runtime time (per-layer-shape table, cached in ~/.cache/compress); factorize "
                                 "a conv only where that is predicted faster, and with a budget rule choose the "
                                 "split per conv")
    latency_threads: int = option(1, "ONNX Runtime threads for the latency_aware measurements (match deployment)")
    skip_first_last: bool = option(True, "leave dense the layer reading the model input and the one writing its output")
    exclude: str = option("", "comma-separated glob patterns of layer names to leave dense, e.g. 'layer1.*,linear'")
    dry_run: bool = option(False, "print the per-layer plan and leave the model unchanged")
    finetune_epochs: int = option(0, "recovery fine-tuning epochs on the train data after factorizing")
    distill: bool = option(True, "fine-tune by distilling from the unfactorized model (works without labels)")
    lr: float = option(0.01, "fine-tuning learning rate (SGD, momentum 0.9, cosine decay)")
    batch_size: int = option(128, "fine-tuning batch size")

    def check_given(self, given: set[str]) -> None:
        """ratio, energy and budget each belong to rank rules: an option the rule would ignore is an error, and
        energy alone picks its rule (ratio is the default rule; budget needs the user to say what it budgets)."""
        rules_of = {"ratio": ("ratio",), "energy": ("energy",), "budget": BUDGET_RULES}
        named = sorted(given & set(rules_of))
        if "rank_rule" not in given and named:
            if len(named) > 1:
                raise UserError(f"{' and '.join(named)} belong to different rank rules: give one (with its rank_rule)")
            if named == ["budget"]:
                raise UserError("budget is the fraction a budget rule keeps: add rank_rule params, flops or latency")
            self.rank_rule = named[0]
        for key in named:
            if self.rank_rule not in rules_of[key]:
                raise UserError(f"{key} applies to rank_rule {' / '.join(rules_of[key])}, not {self.rank_rule}: "
                                f"drop it or change rank_rule")

    def validate(self) -> None:
        if not 0 < self.ratio <= 1:
            raise UserError(f"ratio is r / min(N, M): in (0, 1], got {self.ratio}")
        if not 0 < self.energy <= 1:
            raise UserError(f"energy is a fraction of the spectral energy: in (0, 1], got {self.energy}")
        if not 0 < self.budget < 1:
            raise UserError(f"budget is the fraction of params/FLOPs to keep: in (0, 1), got {self.budget}")
        if self.finetune_epochs < 0:
            raise UserError(f"finetune_epochs must be 0 or more, got {self.finetune_epochs}")
        if self.lr <= 0 or self.batch_size < 1:
            raise UserError("lr must be positive and batch_size at least 1")
        if self.latency_threads < 1:
            raise UserError(f"latency_threads must be at least 1, got {self.latency_threads}")
        if self.rank_rule == "latency":
            self.latency_aware = True

    def check_model(self, lm: LoadedModel) -> None:
        """An already factorized model would have each factor pair split again: more layers, no gain."""
        done = [h for h in lm.history if h.get("stage") == "lowrank"]
        if done:
            raise UserError(f"{lm.source} is already factorized (lowrank {done[-1].get('method')}): lowrank the "
                            f"model it came from, with another rank rule")


@dataclass
class FWSVDConfig(LowRankConfig):
    fisher: str = option("labels", "Fisher source: 'labels' (labeled train data, task loss: the paper's empirical "
                         "Fisher) or 'model' (unlabeled calib data, labels sampled from the model: true Fisher)")
    fisher_samples: int = option(1000, "samples for the Fisher information (per-sample gradients)")
    fisher_batch: int = option(32, "batch size of the Fisher pass")
    fisher_rows: str = option("diag", "'diag': each input feature weighted by its summed Fisher (the paper); 'full': "
                              "the N×N row Fisher Σ per-sample ΓΓᵀ (its diagonal is the paper's), factorized as "
                              "svd(R^½ W), keeping the correlations between input features (an extension)",
                              choices=("diag", "full"))

    def validate(self) -> None:
        super().validate()
        if self.fisher not in FISHER_SOURCES:
            raise UserError(f"fisher: {self.fisher!r} is not one of {', '.join(FISHER_SOURCES.names())}")
        if self.fisher_samples < 1 or self.fisher_batch < 1:
            raise UserError("fisher_samples and fisher_batch must be at least 1")


class LowRankMethod(Method):
    family: ClassVar[str] = "lowrank"
    Config: ClassVar[type] = LowRankConfig
    weighted: ClassVar[bool] = False

    def fisher(self, lm: LoadedModel, layers: dict[str, nn.Module], cfg: Any, ctx: Context):
        return None, {}

    def plan(self, lm: LoadedModel, cfg: Any, ctx: Context) -> tuple[Plan, dict]:
        """The per-layer plan (and a record of the Fisher pass, for FWSVD), without changing the model."""
        model = lm.model.eval()
        infos = probe(model, lm.spec.example(1, ctx.seed))
        cands = candidates(infos, cfg.skip_first_last, cfg.exclude)
        layers = {i.name: i.module for i in cands}
        fisher, record = self.fisher(lm, layers, cfg, ctx) if layers else (None, {})
        record = dict(record)  # (a cached record stays whole)
        row_fisher = record.pop("_row_fisher", None)
        latency = None
        if cfg.latency_aware or cfg.rank_rule == "latency":
            from compress.lowrank.latency import LatencyCosts

            latency = LatencyCosts(cfg.latency_threads)
        with status("decomposing" if latency is None else "measuring candidate layer latencies and decomposing"):
            plan = make_plan(infos, cfg.rank_rule, ratio=cfg.ratio, energy=cfg.energy, budget=cfg.budget,
                             conv_split=cfg.conv_split, skip_first_last=cfg.skip_first_last, exclude=cfg.exclude,
                             fisher=fisher, row_fisher=row_fisher, latency=latency, model_params=count_params(model),
                             model_flops=count_flops(model, lm.spec.shape))
        if latency is not None:
            record["latency_table"] = {"path": str(latency.path), "new_measurements": latency.table.measured,
                                       "threads": cfg.latency_threads}
        return plan, record

    def apply(self, lm: LoadedModel, cfg: Any, ctx: Context) -> LoadedModel:
        """Factorizes lm.model in place (the pipeline hands each stage a clone) and returns the new variant."""
        lm.require_compressible(f"lowrank {self.name}")
        t0 = time.perf_counter()
        plan, fisher_record = self.plan(lm, cfg, ctx)
        log(plan_table(plan, f"{self.name}: rank rule {cfg.rank_rule}"))
        entry: dict[str, Any] = {"stage": "lowrank", "method": self.name, "config": asdict(cfg), **fisher_record,
                                 "plan": plan.to_dict()}
        if cfg.dry_run or not plan.factorized():
            if not plan.factorized() and not cfg.dry_run:
                log("lowrank: no layer is worth factorizing under this rule; the model is unchanged")
            entry["dry_run"] = bool(cfg.dry_run)
            return LoadedModel(lm.model, lm.spec, lm.kind, lm.source, lm.arch, dict(lm.arch_kwargs), list(lm.edits),
                               [*lm.history, entry], lm.sha256)
        model = lm.model
        teacher = copy.deepcopy(model).eval() if cfg.finetune_epochs and cfg.distill else None
        for p in plan.factorized():
            layer = model.get_submodule(p.name)
            set_submodule(model, p.name, factorize_layer(layer, p.rank, p.split, decomposition=plan.decompositions[p.name]))
        edit = {"kind": "lowrank", "method": self.name,
                "layers": [{"name": p.name, "rank": p.rank, "split": p.split} for p in plan.factorized()]}
        # the plan's FLOPs arithmetic equals FlopCounterMode's (tests/compress/test_lowrank.py): no second pass
        after = {"params": count_params(model), "flops": plan.flops[1]}
        entry.update({"params_before": plan.params[0], "params_after": after["params"],
                      "flops_before": plan.flops[0], "flops_after": after["flops"],
                      "layers_factorized": len(plan.factorized()),
                      "seconds_factorize": round(time.perf_counter() - t0, 2)})
        log(f"lowrank {self.name}: {len(plan.factorized())} layers factorized, params "
            f"{plan.params[0] / 1e3:.0f}k -> {after['params'] / 1e3:.0f}k, FLOPs "
            f"{plan.flops[0] / 1e6:.1f}M -> {after['flops'] / 1e6:.1f}M")
        if cfg.finetune_epochs:
            entry["finetune"] = recover(model, ctx, cfg, teacher)
        return LoadedModel(model.eval(), lm.spec, "compress", lm.source, lm.arch, dict(lm.arch_kwargs),
                           [*lm.edits, edit], [*lm.history, entry])


def recover(model: nn.Module, ctx: Context, cfg: Any, teacher: nn.Module | None) -> list[dict]:
    """Recovery fine-tuning through the shared compress.finetune (imported lazily: optional for this family)."""
    if getattr(model, "input_kind", "image") == "tokens":
        raise UserError("recovery fine-tuning is implemented for image classifiers (compress.finetune); "
                        "it has no loss for a sentence encoder: use finetune_epochs 0")
    try:
        from compress.finetune import finetune
    except ImportError as e:  # pragma: no cover - depends on the installed tree
        raise UserError(f"recovery fine-tuning needs compress.finetune ({e}); use finetune_epochs 0") from None
    epochs: list[dict] = []
    kwargs = dict(teacher=teacher, distill=cfg.distill)
    if "log" in inspect.signature(finetune).parameters:
        kwargs["log"] = epochs
    finetune(model, ctx, cfg.finetune_epochs, cfg.lr, cfg.batch_size, **kwargs)
    return epochs


class SVD(LowRankMethod):
    name = "svd"
    summary = "truncated SVD of each layer's weight (Linear → 2 Linears, Conv k×k → k×k + 1×1)"


class FWSVD(LowRankMethod):
    name = "fwsvd"
    Config = FWSVDConfig
    weighted = True
    summary = "Fisher-weighted SVD (Hsu et al., ICLR 2022): input features weighted by per-sample-gradient Fisher"

    def fisher(self, lm: LoadedModel, layers: dict[str, nn.Module], cfg: FWSVDConfig, ctx: Context):
        """(per-weight Fisher, record); with fisher_rows full the record carries "_row_fisher" for the plan."""
        t0 = time.perf_counter()
        row_splits, rows = None, {}
        if cfg.fisher_rows == "full":
            latency_budget = (cfg.latency_aware or cfg.rank_rule == "latency") and cfg.rank_rule in BUDGET_RULES
            row_splits = {name: tuple(_splits(m, cfg.rank_rule, cfg.conv_split, latency_budget))
                          for name, m in layers.items()}
        fisher, n = fisher_from_source(lm, ctx, cfg.fisher, layers, cfg.fisher_samples, cfg.fisher_batch,
                                       row_splits, rows)
        rec = {"fisher": {"source": cfg.fisher, "labels": FISHER_SOURCES.get(cfg.fisher).labels,
                          "samples": n, "rows": cfg.fisher_rows, "seconds": round(time.perf_counter() - t0, 2)}}
        if row_splits:
            rec["_row_fisher"] = rows
        return fisher, rec


METHODS.add("svd", SVD())
METHODS.add("fwsvd", FWSVD())
