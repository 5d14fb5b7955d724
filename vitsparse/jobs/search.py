"""The search job: prune to a budget measured on the target, re-planning from what it measured.

    search(source, target=..., budget="latency=0.5", methods=(...), out=DIR) -> SearchReport

1. The dense model is compiled and measured on the target (this machine, or a device behind an
   RPC tracker): a relative budget (``latency=0.5``) becomes milliseconds (or millijoules).
2. The target's cost table prices candidates (`vitsparse.pruning.latency.LatencyModel`): the one
   given, or one profiled for this model's shapes and cached per target key and device.
3. Per method, the criterion's own budget (its kept FLOPs fraction) is the knob: it is set so
   that the corrected prediction lands inside the window (later: from the method's own
   measurements), the plan is made, compiled, checked against its PyTorch reference, measured
   in rounds alternated with the dense model (the ratio judges a relative budget), and the
   measurement corrects the cost model (per block and kernel shape, carried to the next
   candidate and method); then re-plan, until the measurement is within ``WINDOW`` of the
   budget or ``iterations`` candidates were measured.
4. Every candidate's quality: accuracy where the data has labels, fidelity to the dense model
   always (after ``finetune_steps`` of distillation when asked).
5. OUT/ holds the journal (every candidate, rewritten atomically after each), the front
   (quality vs measured latency/energy) as markdown and PNG, the chosen plan (the most accurate
   within budget) and its compiled artifact. Re-running with the same OUT resumes: a candidate in
   the journal is not measured again.

With ``precision`` bf16, fp16 or int8 the candidates compile in that precision (int8 calibrated
on the data's calibration part, for each plan) while the dense model they are measured against stays
fp32: a relative budget is of the fp32 model, so the precision's speed counts toward it and
less has to be pruned. The unpruned model in the precision is measured first: the methods start
from it and it fits the cost model's correction. A candidate is checked against the PyTorch
model of its computation (`plan.quantize.reference_model`) and its quality is that model's.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vitsparse._io import cache_dir, write_bytes_atomic, write_text_atomic
from vitsparse.data.sources import ImageSet, load_images
from vitsparse.devices import Timing, check_measurable, measure
from vitsparse.devices.meters import NoMeter, meter_for
from vitsparse.devices.threads import chosen_threads, set_num_threads
from vitsparse.errors import DataError, PlanError, SearchError, TargetError
from vitsparse.frontend import RANDOM_WEIGHTS_SEED, import_model, load_torch_model
from vitsparse.jobs._inputs import Inputs, resolve_inputs, source_label
from vitsparse.jobs.compile import compile_resolved
from vitsparse.jobs.finetune import finetune as run_finetune
from vitsparse.jobs.finetune_report import MODEL_FILE, PLAN_FILE
from vitsparse.jobs.profile import profile
from vitsparse.jobs.profile_grids import Grid
from vitsparse.plan import PruningPlan, apply_plan_to_torch, geometry_of, weights_hash
from vitsparse.plan.quantize import reference_model
from vitsparse.pruning.budget import Budget, MeasuredBudget
from vitsparse.pruning.calibrate import calibrate
from vitsparse.pruning.criteria import make_plan
from vitsparse.pruning.evaluate import compare
from vitsparse.pruning.latency import LatencyModel
from vitsparse.targets.cost_table import CostTable

METHODS = ("nvit", "lpvit", "cpvit", "upvit", "magnitude", "combined")
WINDOW = (0.93, 1.0)
AIM = 0.965  # where in the window a prediction aims
JOURNAL = "journal.jsonl"
FORMAT = "vitsparse-search/1"
TIMING = Timing(repeat=5, number=1, warmup=3, min_repeat_ms=25)  # each sample 25 ms or more
ROUNDS = 3  # a candidate's measurements, each after one of the dense model's
REDUCED_TOLERANCE = 0.3  # of a reduced precision's distance from fp32 (see _Loop._measure)
LOWEST = 0.02  # the smallest kept FLOPs fraction a method is asked for
_KNOBS = {  # the knobs each method plans with in a search
    "magnitude": {"kind": "blocks"},
    "magnitude-structure": {"kind": "structure"},
}
_METHOD = {"magnitude-structure": "magnitude"}
_PRICED = ("nvit", "lpvit", "combined")  # criteria that take the measured cost model
_UNRECORDED = {"precision": "fp32"}  # identity fields of journals written before they existed


@dataclass
class SearchReport:
    """What `search` did: the budget in absolute units, the dense measurement, every candidate
    (journal entries), the chosen one, and where the outputs are."""

    model: str
    target: str
    device: str
    budget: dict
    limit: float
    unit: str
    dense: dict
    candidates: list[dict] = field(default_factory=list)
    chosen: dict | None = None
    out: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    precision: str = "fp32"  # the candidates' (the dense model's is fp32)
    start: dict | None = None  # the unpruned model in that precision (None in fp32)

    def to_json(self) -> dict:
        return dict(self.__dict__)

    def summary(self) -> str:
        lines = [
            f"search    {self.model} on {self.device}: {self.budget['text']} -> "
            f"{self.limit:.3f} {self.unit} (dense {self.dense['measured']:.3f} {self.unit})"
            + ("" if self.precision == "fp32" else f"; candidates in {self.precision}")
        ]
        if self.start is not None:
            lines.append(
                f"  unpruned {self.precision}: {self.start['measured']:.3f} {self.unit} "
                f"({self.start['ratio_to_dense']:.2f} of dense)"
            )
        for c in self.candidates:
            lines.append(f"  {_describe(c, self.unit)}")
        if self.chosen is None:
            lines.append("chosen    none within budget")
        else:
            lines.append(f"chosen    {_describe(self.chosen, self.unit)}")
        lines += [f"note      {n}" for n in self.notes]
        lines.append(f"out       {self.out} ({self.seconds:.0f} s)")
        return "\n".join(lines)


def search(
    source,
    *,
    budget: str | MeasuredBudget,
    out: str | Path,
    target="x86",
    rpc=None,
    methods: Sequence[str] = METHODS,
    data: str | Path = "synthetic",
    calib_size: int = 64,
    eval_size: int = 256,
    finetune_steps: int = 0,
    iterations: int = 4,
    batch: int = 1,
    threads: int | None = None,
    cost_table: str | Path | CostTable | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    weights_seed: int = RANDOM_WEIGHTS_SEED,
    cuda_arch: str | None = None,
    timing: Timing = TIMING,
    energy_seconds: float = 1.0,
    priced: bool = True,
    precision: str = "fp32",
    progress: Callable[[str], None] | None = print,
) -> SearchReport:
    """Search ``methods`` for the most accurate plan of ``source`` within ``budget`` measured on
    ``target`` (see the module docstring); writes ``out``/ and returns the report.

    ``priced=False`` gives NViT, LPViT and combined the analytic FLOPs cost instead of the
    measured model (the loop still measures and re-plans): the control that shows what the
    measured cost adds. ``precision`` is the candidates' (see the module docstring)."""
    say = progress or (lambda _line: None)
    started = time.time()
    if isinstance(budget, str):
        budget = MeasuredBudget.parse(budget, batch=batch, threads=threads)
    unknown = [m for m in methods if m not in (*METHODS, "magnitude-structure")]
    if unknown or not methods:
        raise PlanError(
            f"unknown search method(s) {unknown or '(none given)'}; known: "
            f"{', '.join((*METHODS, 'magnitude-structure'))}"
        )
    for name, value in (("iterations", iterations), ("calib_size", calib_size)):
        if value < 1:
            raise PlanError(f"{name} must be >= 1, got {value}")
    if finetune_steps < 0:
        raise PlanError(f"finetune_steps must be >= 0, got {finetune_steps}")
    if budget.metric == "energy" and energy_seconds <= 0:
        raise PlanError("an energy budget needs an energy window: energy_seconds > 0")
    if budget.threads is not None:
        set_num_threads(budget.threads)
    inputs = resolve_inputs(target=target, cuda_arch=cuda_arch, rpc=rpc)
    # The candidates' precision, refused here where the target lacks it. int8's calibration
    # images are the data's calibration part (`_Loop.quantization`), not a --calib source.
    reduced = dataclasses.replace(
        resolve_inputs(target=target, cuda_arch=cuda_arch, precision=precision, calib=str(data)),
        rpc=rpc,
    )
    spec = inputs.spec
    check_measurable(spec, rpc, "search")
    meter = _meter(budget, spec, rpc)
    out = Path(out)
    model, model_id = load_torch_model(
        source, checkpoint=checkpoint, pretrained=pretrained, seed=weights_seed
    )
    model.eval()
    journal = Journal.open(out / JOURNAL)
    device = f"rpc:{rpc.key}" if rpc is not None else spec.device_type
    threads_used = budget.threads or chosen_threads()
    identity = {
        "format": FORMAT,
        "model": model_id,
        "weights": weights_hash(model),
        "target": spec.key,
        "device": device,
        "budget": budget.to_json(),
        "threads": threads_used,
        "data": str(data),
        "calib_size": calib_size,
        "eval_size": eval_size,
        "methods": list(methods),
        "finetune_steps": finetune_steps,
        "priced": priced,
        "precision": precision,
    }
    # Checked before the (slow) cost table, then with it; written with the first measurement.
    journal.check_identity(identity)
    size = model.patch_embed.img_size[0]
    calib, held_out = _data(data, size, calib_size, eval_size)
    table = _cost_table(cost_table, model, spec, rpc, threads_used, say)
    identity["cost_table"] = _table_digest(table)
    journal.check_identity(identity)
    imported = import_model(model, batch=budget.batch)
    x = np.random.default_rng(0).standard_normal(imported.input_shape).astype(np.float32)
    say(
        f"[search] {source_label(source)} on {spec.key} ({device}): {budget.describe()}, "
        f"{'' if precision == 'fp32' else precision + ' candidates, '}"
        f"methods {', '.join(methods)}; journal {journal.path}"
    )
    cost = LatencyModel(table)
    loop = _Loop(
        model,
        model_id,
        imported,
        inputs,
        reduced,
        rpc,
        meter,
        budget,
        cost,
        journal,
        x,
        timing,
        energy_seconds,
        calib,
        held_out,
        finetune_steps,
        data,
        out,
        say,
    )
    loop.priced = priced
    dense = loop.dense()
    limit = budget.absolute(dense["measured"])
    say(f"[search] dense: {dense['measured']:.3f} {budget.unit}; budget {limit:.3f} {budget.unit}")
    start = loop.reduced_dense()
    notes = []
    if start is not None and start["measured"] <= limit:
        notes.append(
            f"the unpruned {precision} model is within the budget already "
            f"({start['measured']:.3f} {budget.unit})"
        )
    for method in methods:
        notes += loop.run(method, limit, iterations)
    inside = [c for c in loop.candidates if c["under"] and c["correct"]]
    if not inside:
        smallest = min(loop.candidates, key=lambda c: c["measured"], default=None)
        what = (
            f"the smallest measured was {smallest['measured']:.3f} {budget.unit} "
            f"({smallest['method']} at flops={smallest['fraction']:.3f})"
            if smallest
            else "no method made a plan"
        )
        raise SearchError(
            f"no plan reached {budget.describe()} = {limit:.3f} {budget.unit} on {device}: "
            f"{what}. The journal is kept in {journal.path}"
        )
    chosen = max(inside, key=_quality_key)
    report = SearchReport(
        model=model_id,
        target=spec.key,
        device=device,
        budget={**budget.to_json(), "text": budget.describe()},
        limit=limit,
        unit=budget.unit,
        dense=dense,
        candidates=loop.candidates,
        chosen=chosen,
        out=str(out),
        notes=notes,
        precision=precision,
        start=start,
    )
    loop.export_chosen(chosen)
    report.seconds = time.time() - started
    _write_outputs(report, out)
    return report


class Journal:
    """Every candidate as a JSON line; the file is rewritten atomically after each entry, so a
    kill leaves the previous version whole. A torn last line (a file written by other means) is
    skipped with a warning; a bad line elsewhere is an error naming it."""

    def __init__(self, path: Path, entries: list[dict]):
        self.path, self.entries = path, entries
        self.header: dict | None = None  # written before the first entry of a new journal

    @classmethod
    def open(cls, path: Path) -> Journal:
        if not path.exists():
            return cls(path, [])
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            raise SearchError(f"{path}: not a text file; not a search journal") from None
        entries = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict):
                    raise SearchError(f"{path}: line {number} is not a JSON object")
                entries.append(entry)
            except json.JSONDecodeError:
                if number == len(lines):
                    warnings.warn(f"{path}: skipping a torn last line", RuntimeWarning, 2)
                    continue
                raise SearchError(
                    f"{path}: line {number} is not JSON; the journal is damaged"
                ) from None
        return cls(path, entries)

    def check_identity(self, identity: dict) -> None:
        header = next((e for e in self.entries if e.get("kind") == "header"), None)
        if header is None:  # a new journal: the header waits for the first entry
            self.header = {**(self.header or {"kind": "header"}), **identity}
            return
        theirs = {k: header.get(k, _UNRECORDED.get(k)) for k in identity}
        differ = [k for k in identity if theirs[k] != identity[k]]
        if differ:
            raise SearchError(
                f"{self.path.parent} holds a search with another "
                f"{', '.join(differ)} ({', '.join(f'{k}={theirs[k]!r}' for k in differ)}); "
                "give another --out or remove it"
            )

    def find(self, kind: str, key: str) -> dict | None:
        return next(
            (e for e in self.entries if e.get("kind") == kind and e.get("key") == key), None
        )

    def append(self, entry: dict) -> None:
        if self.header is not None:
            self.entries.insert(0, self.header)
            self.header = None
        self.entries.append(entry)
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.entries)
        write_text_atomic(self.path, text)


class _Loop:
    """The per-method loop and what every candidate shares."""

    def __init__(
        self, model, model_id, imported, inputs: Inputs, reduced: Inputs, rpc, meter, budget,
        cost, journal, x, timing, energy_seconds, calib, held_out, finetune_steps, data, out, say,
    ):  # fmt: skip
        self.model, self.model_id, self.imported, self.inputs = model, model_id, imported, inputs
        self.reduced = reduced  # the candidates' inputs: their precision (fp32: ``inputs``)
        self.rpc, self.meter, self.budget, self.cost = rpc, meter, budget, cost
        self.journal, self.x, self.timing, self.energy_seconds = journal, x, timing, energy_seconds
        self.calib, self.held_out, self.finetune_steps = calib, held_out, finetune_steps
        self.data, self.out, self.say = data, out, say
        self.candidates: list[dict] = []
        self.dense_measured = 0.0  # the dense model's measurement
        self.start = 0.0  # the unpruned model's in the search's precision (fp32: the dense one)
        self._dense = None  # the dense model compiled (for the side-by-side measurements)
        self._last = None  # (plan digest, compiled) of the latest candidate
        self.priced = True  # whether the criteria that take a cost model get the measured one
        self.floor: dict[str, float] = {}  # per method: the smallest fraction it planned at
        self._plans: dict[str, PruningPlan] = {}

    # --- measuring --------------------------------------------------------------------------

    def _measure(self, plan: PruningPlan | None, *, in_precision: bool = False) -> dict:
        """Compile ``model`` pruned by ``plan``, check it against PyTorch, measure it: ``ROUNDS``
        measurements alternated with the dense model's, so that the ratio to dense holds while
        the machine drifts (on a busy host, back-to-back measurements of one model can differ
        by more than the window is wide). A relative budget is judged by that ratio
        (``measured`` is the ratio times the dense model's first measurement); an absolute one
        by the median. ``in_precision``: the unpruned model (``plan`` None) in the search's
        precision, measured like a candidate."""
        began = time.time()
        alternate = plan is not None or in_precision  # (else: this is the fp32 dense model)
        key = plan.digest() if plan is not None else ("unpruned" if in_precision else None)
        if self._last is not None and self._last[0] == key:
            compiled = self._last[1]
        else:
            compiled = self._compile(plan, in_precision=in_precision)
            self._last = (key, compiled)
        compile_s = time.time() - began
        began = time.time()
        dense_exec = self._compile(None).executable if alternate else None
        own, ratios, output, where = [], [], None, ""
        for _ in range(ROUNDS):
            if dense_exec is not None:
                ref = self._time(dense_exec)
            run = self._time(compiled.executable)
            own.append(run)
            if dense_exec is not None:
                ratios.append(_value(run, self.budget) / _value(ref, self.budget))
            output, where = run.output, run.device
        torch_model = self.model if plan is None else apply_plan_to_torch(self.model, plan)
        with torch.no_grad():
            reference = torch_model.eval()(torch.from_numpy(self.x)).numpy()
        tolerance = 1e-3 * max(1.0, float(np.abs(reference).max()))
        reduced = {}
        if compiled.precision != "fp32":
            # Held to the PyTorch model of its computation, within a third of that model's
            # own distance from fp32 (what rounding-tie flips cannot reach; a wrong kernel
            # does): `docs/architecture.md`, "Reduced precision".
            fp32 = reference
            model = reference_model(torch_model, compiled.precision, compiled.quantization)
            with torch.no_grad():
                reference = model.eval()(torch.from_numpy(self.x)).numpy()
            distance = float(np.abs(reference - fp32).max())
            tolerance = max(tolerance, REDUCED_TOLERANCE * distance)
            reduced = {"precision": compiled.precision, "reference_vs_fp32": distance}
        err = float(np.abs(output - reference).max())
        energies = [m.energy_j * 1e3 for m in own if m.energy_j is not None]
        return self._settle(
            {
                "ratios": ratios,
                "latencies_ms": [m.latency.median_ms for m in own],
                "energies_mj": energies,
                "where": where,
                "max_abs_err": err,
                "correct": err <= tolerance,
                "compile_s": round(compile_s, 2),
                "measure_s": round(time.time() - began, 2),
                **reduced,
            }
        )

    def _settle(self, rounds: dict) -> dict:
        """``rounds`` (the per-round lists) with their medians and what the budget counts:
        the median ratio to dense times the dense measurement for a relative budget, the
        median latency (ms) or energy (mJ) for an absolute one."""
        out = dict(rounds)
        out["latency_ms"] = float(np.median(out["latencies_ms"]))
        out["energy_mj"] = float(np.median(out["energies_mj"])) if out["energies_mj"] else None
        out["ratio_to_dense"] = float(np.median(out["ratios"])) if out["ratios"] else 1.0
        if out["ratios"] and self.budget.relative:
            out["measured"] = out["ratio_to_dense"] * self.dense_measured
        else:
            out["measured"] = (
                out["latency_ms"] if self.budget.metric == "latency" else out["energy_mj"]
            )
        return out

    def _confirm(self, plan: PruningPlan, first: dict) -> dict:
        """A measurement near the window's edges, measured again and pooled (the median of all
        its rounds): on a noisy host one measurement can land on either side by chance."""
        again = self._measure(plan)
        pooled = dict(again)
        for key in ("ratios", "latencies_ms", "energies_mj"):
            pooled[key] = first[key] + again[key]
        pooled = self._settle(pooled)
        pooled["compile_s"] = first["compile_s"]
        pooled["measure_s"] = round(first["measure_s"] + again["measure_s"], 2)
        pooled["confirmed"] = True
        return pooled

    def _compile(self, plan: PruningPlan | None, *, in_precision: bool = False):
        """The compiled model: a candidate (or, ``in_precision``, the unpruned model) in the
        search's precision, the dense one in fp32 (compiled once and kept)."""
        if plan is None and not in_precision:
            if self._dense is None:
                inputs = Inputs(self.inputs.spec, rpc=self.rpc)
                self._dense = compile_resolved(self.imported, inputs)
            return self._dense
        inputs = dataclasses.replace(self.reduced, plan=plan)
        quantization = self.quantization(self.model, plan)
        return compile_resolved(self.imported, inputs, quantization=quantization)

    def quantization(self, model: torch.nn.Module, plan: PruningPlan | None = None):
        """int8's activation scales of ``model`` pruned by ``plan``, calibrated on the data's
        calibration part; None in the other precisions (nothing computed)."""
        if self.reduced.precision != "int8":
            return None
        pruned = model if plan is None else apply_plan_to_torch(model, plan)
        describe = {"source": f"{self.data} (the search's calibration images)"}
        return calibrate(pruned, self.calib.images, describe=describe)

    def reduced_model(self, pruned: torch.nn.Module) -> torch.nn.Module:
        """The PyTorch model of what a candidate computes: ``pruned`` in the precision."""
        precision = self.reduced.precision
        return reference_model(pruned, precision, self.quantization(pruned))

    def _time(self, executable):
        return measure(
            executable,
            self.inputs.spec,
            [self.x],
            rpc=self.rpc,
            timing=self.timing,
            meter=self.meter,
            energy_seconds=self.energy_seconds,
        )

    def dense(self) -> dict:
        entry = self.journal.find("dense", "dense")
        if entry is None:
            self.say("[search] compiling and measuring the dense model")
            entry = {"kind": "dense", "key": "dense", **self._measure(None)}
            if not entry["correct"]:
                raise TargetError(
                    f"the compiled dense model differs from PyTorch by {entry['max_abs_err']:.2e}"
                )
            entry["predicted_raw"] = self.cost.raw(self.model, None)
            self.journal.append(entry)
        else:
            self.say(f"[search] dense: from the journal ({entry['measured']:.3f})")
        if self.reduced.precision == "fp32":  # (else the unpruned model in it prices plans)
            self.cost.observe(self.model, None, entry["measured"], "dense")
        self.dense_measured = self.start = entry["measured"]
        return entry

    def reduced_dense(self) -> dict | None:
        """The unpruned model in the search's precision, measured against the fp32 dense model
        like a candidate: the methods start from it (kept FLOPs 1.0) and it prices their
        plans. None in fp32, where it is the dense model."""
        precision = self.reduced.precision
        if precision == "fp32":
            return None
        key = f"dense-{precision}"
        entry = self.journal.find("dense", key)
        if entry is None:
            self.say(f"[search] compiling and measuring the unpruned model in {precision}")
            entry = {"kind": "dense", "key": key, **self._measure(None, in_precision=True)}
            if not entry["correct"]:
                raise TargetError(
                    f"the compiled {precision} model differs from the PyTorch {precision} model "
                    f"by {entry['max_abs_err']:.2e}"
                )
            self.journal.append(entry)
        self.say(
            f"[search] unpruned {precision}: {entry['measured']:.3f} "
            f"({entry['ratio_to_dense']:.2f} of dense)"
        )
        self.cost.observe(self.model, None, entry["measured"], key)
        self.start = entry["measured"]
        return entry

    # --- one method ---------------------------------------------------------------------------

    def plan(self, method: str, fraction: float) -> PruningPlan:
        """``method``'s plan at ``fraction`` of the FLOPs (NViT, LPViT and combined priced by
        the cost model as corrected so far: the key holds how many measurements it has)."""
        priced = method in _PRICED and self.priced
        observed = len(self.cost.observations) if priced else 0
        key = f"{method}@{fraction:.6f}#{observed}"
        if key not in self._plans:
            knobs = dict(_KNOBS.get(method, {}))
            if priced:
                knobs["cost"] = self.cost
            self._plans[key] = make_plan(
                _METHOD.get(method, method),
                self.model,
                self.calib.images,
                Budget("flops", fraction),
                model_id=self.model_id,
                knobs=knobs,
            )
        return self._plans[key]

    def plan_at(self, method: str, fraction: float) -> tuple[float, PruningPlan]:
        """(fraction, plan) of ``method`` at ``fraction`` or, where the criterion cannot go that
        low, at the smallest fraction it reaches (bisected once per method, then kept)."""
        fraction = round(float(min(max(fraction, self.floor.get(method, LOWEST)), 1.0)), 6)
        try:
            return fraction, self.plan(method, fraction)
        except PlanError:
            if fraction >= 1.0:
                raise
        lo, hi = fraction, 1.0  # lo fails; the dense end is assumed to plan
        for _ in range(8):
            mid = round((lo + hi) / 2, 6)
            try:
                self.plan(method, mid)
                hi = mid
            except PlanError:
                lo = mid
        self.floor[method] = hi
        return hi, self.plan(method, hi)

    def propose(self, method: str, fraction: float, target: float, tries: int = 4):
        """(fraction, plan, predicted) of the plan whose corrected prediction is nearest
        ``target``: secant steps on the kept FLOPs fraction from ``fraction`` (and the dense
        model at 1.0), each a real plan."""
        points = [(1.0, self.cost.predict(self.model, None))]
        best = None
        for _ in range(tries):
            fraction, plan = self.plan_at(method, fraction)
            predicted = self.cost.predict(self.model, plan)
            if best is None or abs(predicted - target) < abs(best[2] - target):
                best = (fraction, plan, predicted)
            if abs(predicted / target - 1) < 0.015:
                break
            (f0, p0) = min(points, key=lambda p: abs(p[0] - fraction))
            points.append((fraction, predicted))
            previous = fraction
            if abs(predicted - p0) < 1e-9 or f0 == fraction:
                fraction *= target / predicted
            else:
                fraction += (target - predicted) * (fraction - f0) / (predicted - p0)
            fraction = min(max(fraction, previous / 2), previous * 2)  # no wild extrapolation
            if fraction <= self.floor.get(method, LOWEST) and best[0] <= self.floor.get(
                method, LOWEST
            ):
                break
        return best

    def run(self, method: str, limit: float, iterations: int) -> list[str]:
        """Candidates of ``method`` until one measures inside the window; notes for the report.

        The first plan is the one the corrected cost model prices at the aim; after that, the
        kept FLOPs fraction comes from this method's own measurements (and the dense model's at
        1.0): interpolated between the two that bracket the aim, else extrapolated from the two
        nearest it."""
        aim = AIM * limit
        fraction = aim / self.cost.predict(self.model, None)
        points = [(1.0, self.start)]
        seen: set[str] = set()
        for iteration in range(1, iterations + 1):
            try:
                if len(points) == 1:  # the corrected cost model's plan at the aim
                    fraction, plan, predicted = self.propose(method, fraction, aim)
                else:  # this method's measurements decide
                    fraction = _next_fraction(points, aim, self.floor.get(method, LOWEST))
                    fraction, plan = self.plan_at(method, fraction)
                    for _ in range(3):  # plans are steps in the fraction: step past a measured one
                        if _content_key(plan) not in seen:
                            break
                        fraction *= 0.92 if points[-1][1] > aim else 1.08
                        fraction, plan = self.plan_at(method, fraction)
                    predicted = self.cost.predict(self.model, plan)
            except PlanError as err:
                self.say(f"[search] {method}: no plan ({err})")
                return [f"{method}: no plan at the budget ({err})"]
            key = _content_key(plan)
            if key in seen:
                return [f"{method}: its plans stop changing near flops={fraction:.3f}"]
            seen.add(key)
            entry = self.journal.find("candidate", key)
            if entry is None:
                began = time.time()
                measured = self._measure(plan)
                if _near_edge(measured["measured"], limit):
                    measured = self._confirm(plan, measured)
                entry = {
                    "kind": "candidate",
                    "key": key,
                    "method": method,
                    "iteration": iteration,
                    "fraction": fraction,
                    "predicted": predicted,
                    "predicted_raw": self.cost.raw(self.model, plan),
                    **measured,
                    "kept_flops": Budget("flops", 1.0).kept(self.model, plan),
                    **self._quality(plan, key),
                }
                entry["seconds"] = round(time.time() - began, 1)
                entry["within"] = WINDOW[0] * limit <= entry["measured"] <= WINDOW[1] * limit
                entry["under"] = entry["measured"] <= limit
                if not entry["correct"]:  # kept so that the wrong compile can be reproduced
                    entry["plan_file"] = str(self._keep_wrong(plan, key))
                self.journal.append(entry)
                source = "measured"
            else:
                entry = {**entry, "iteration": iteration}
                source = "from the journal"
            self.cost.observe(self.model, plan, entry["measured"], f"{method}#{iteration}")
            self.candidates.append(entry)
            points.append((fraction, entry["measured"]))
            self.say(
                f"[search] {method} #{iteration}: flops={fraction:.3f} predicted "
                f"{predicted:.3f}, {source} {entry['measured']:.3f} (budget {limit:.3f}, "
                f"error {100 * (predicted / entry['measured'] - 1):+.1f}%) {_quality_text(entry)}"
                + (
                    ""
                    if entry["correct"]
                    else f" WRONG OUTPUT (max error {entry['max_abs_err']:.2e}; plan in "
                    f"{entry.get('plan_file', 'the journal')})"
                )
            )
            if entry["within"] and entry["correct"]:
                return []
            lowest = self.floor.get(method, LOWEST)
            if fraction <= lowest * 1.001 and entry["measured"] > limit:
                return [
                    f"{method}: above the budget even at its smallest plan (flops={fraction:.3f})"
                ]
        best = [c for c in self.candidates if c["method"] == method and c["under"] and c["correct"]]
        return [
            f"{method}: not inside [{WINDOW[0]}, {WINDOW[1]}] of the budget after "
            f"{iterations} candidates" + (" (one under it is kept)" if best else " (none under it)")
        ]

    # --- quality and outputs -------------------------------------------------------------------

    def _quality(self, plan: PruningPlan, key: str) -> dict:
        if not self.finetune_steps:
            pruned = self.reduced_model(apply_plan_to_torch(self.model, plan))
            return _quality_fields(compare(self.model, pruned, self.held_out))
        ft_out = self.out / "finetune" / key[:16]
        ft = run_finetune(
            self.model,
            plan=plan,
            data="digits-train" if str(self.data) == "digits" else self.data,
            out=ft_out,
            steps=self.finetune_steps,
            resume=(ft_out / "state.pt").exists(),
            model_id=self.model_id,
            progress=None,
        )
        student, plan = self._finetuned(Path(ft.out))
        pruned = self.reduced_model(apply_plan_to_torch(student, plan))
        report = compare(self.model, pruned, self.held_out)
        return {**_quality_fields(report), "finetuned": str(ft.out)}

    def _finetuned(self, where: Path) -> tuple[torch.nn.Module, PruningPlan]:
        """The fine-tuned model (a copy: the dense one stays the teacher) and its plan."""
        student, _ = load_torch_model(copy.deepcopy(self.model), checkpoint=where / MODEL_FILE)
        return student, PruningPlan.load(where / PLAN_FILE)

    def export_chosen(self, chosen: dict) -> None:
        """OUT/plan.json and OUT/artifact/ of the chosen candidate (its fine-tuned weights and
        re-issued plan when it was fine-tuned; OUT/model.pt then holds the weights)."""
        imported = self.imported
        if "finetuned" in chosen:
            student, plan = self._finetuned(Path(chosen["finetuned"]))
            imported = import_model(student, batch=self.budget.batch)
            write_bytes_atomic(
                self.out / MODEL_FILE, (Path(chosen["finetuned"]) / MODEL_FILE).read_bytes()
            )
        else:
            plan = self._plan_of(chosen["key"])
        plan.save(self.out / PLAN_FILE)
        inputs = dataclasses.replace(self.reduced, plan=plan)
        quantization = self.quantization(imported.torch_model, plan)
        compiled = compile_resolved(imported, inputs, quantization=quantization)
        compiled.export(self.out / "artifact")

    def _keep_wrong(self, plan: PruningPlan, key: str) -> Path:
        """Save the plan of a candidate that compiled to a wrong output (DIR/wrong/KEY.json):
        ``vitsparse compile MODEL --plan`` on it reproduces the compile."""
        path = self.out / "wrong" / f"{key[:16]}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        plan.save(path)
        return path

    def _plan_of(self, key: str) -> PruningPlan:
        return next(p for p in self._plans.values() if _content_key(p) == key)


def _content_key(plan: PruningPlan) -> str:
    """What a plan prunes, hashed (its budget and predictions left out): two plans with the same
    key compile to the same model."""
    return dataclasses.replace(plan, budget={}, predicted_cost=None, weights_seed=None).digest()


def _near_edge(measured: float, limit: float) -> bool:
    """Outside the window but within a few percent of it: worth a second measurement."""
    low, high = WINDOW[0] * limit, WINDOW[1] * limit
    return not low <= measured <= high and 0.96 * low <= measured <= 1.04 * high


def _value(measured, budget: MeasuredBudget) -> float:
    """What a budget counts of one measurement: its median latency (ms) or energy (mJ)."""
    if budget.metric == "latency":
        return measured.latency.median_ms
    return measured.energy_j * 1e3


def _next_fraction(points: list[tuple[float, float]], aim: float, lowest: float) -> float:
    """The kept FLOPs fraction expected to measure ``aim``, from (fraction, measured) points:
    linear between the nearest points on either side of the aim, else through the two points
    nearest it (at most halving or doubling the nearest fraction); a proportional step where
    the points do not rise with the fraction."""
    below = [p for p in points if p[1] <= aim]
    above = [p for p in points if p[1] > aim]
    if below and above:
        (f0, m0), (f1, m1) = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
    else:
        (f0, m0), (f1, m1) = sorted(points, key=lambda p: abs(p[1] - aim))[:2]
    nearest = min(points, key=lambda p: abs(p[1] - aim))
    if f1 == f0 or (m1 - m0) / (f1 - f0) <= 0:
        guess = nearest[0] * aim / nearest[1]
    else:
        guess = f0 + (aim - m0) * (f1 - f0) / (m1 - m0)
    guess = min(max(guess, nearest[0] / 2), nearest[0] * 2)
    return float(min(max(guess, lowest), 1.0))


def _quality_fields(report) -> dict:
    return {
        "data": report.data,
        "images": report.images,
        "top1": report.top1_pruned,
        "top1_dense": report.top1_dense,
        "agreement": report.agreement,
        "mean_kl": report.mean_kl,
    }


def _quality_key(c: dict) -> tuple:
    top1 = c.get("top1")
    return (-1.0 if top1 is None else top1, c["agreement"], -c["mean_kl"], -c["measured"])


def _quality_text(c: dict) -> str:
    top1 = "" if c.get("top1") is None else f"top-1 {100 * c['top1']:.1f}%, "
    return f"[{top1}agreement {100 * c['agreement']:.1f}%]"


def _describe(c: dict, unit: str) -> str:
    return (
        f"{c['method']:<19} #{c['iteration']} flops={c['fraction']:.3f} "
        f"{c['measured']:.3f} {unit} (predicted {c['predicted']:.3f}) {_quality_text(c)}"
    )


def _meter(budget: MeasuredBudget, spec, rpc):
    if budget.metric != "energy":
        return None
    meter = NoMeter("no meter is read over RPC") if rpc is not None else meter_for(spec.device_type)
    if not meter.available:
        raise TargetError(
            f"an energy budget needs a power meter on the target; {spec.key} has none here "
            f"({meter.reason}). Give a latency budget instead"
        )
    return meter if meter.available else None


def _data(data, size: int, calib_size: int, eval_size: int):
    """(calibration images, held-out images): the digits' train and test splits, an
    ImageFolder's first ``calib_size`` images and up to ``eval_size`` of them, or two seeds of
    synthetic images."""
    name = str(data)
    if name in ("digits", "digits-train"):
        return (
            load_images("digits-train", image_size=size, limit=calib_size),
            load_images("digits", image_size=size, limit=eval_size),
        )
    if name == "synthetic":
        return (
            load_images("synthetic", image_size=size, limit=calib_size, seed=0),
            load_images("synthetic", image_size=size, limit=min(eval_size, 64), seed=1),
        )
    images = load_images(data, image_size=size, limit=calib_size + eval_size)
    if len(images) <= calib_size:
        raise DataError(
            f"{data}: {len(images)} images; the search needs more than --calib-size "
            f"({calib_size}) to hold some out for quality"
        )
    labels = images.labels
    return (
        ImageSet(images.name, images.images[:calib_size], _part(labels, 0, calib_size)),
        ImageSet(images.name, images.images[calib_size:], _part(labels, calib_size, None)),
    )


def _part(labels, start, stop):
    return None if labels is None else labels[start:stop]


def _table_digest(table: CostTable) -> str:
    """The cost table's measurements, hashed: a search resumes only with the same table."""
    rows = json.dumps([table.kernels, table.blocks], sort_keys=True)
    return hashlib.sha256(rows.encode("utf-8")).hexdigest()[:16]


def _cost_table(given, model, spec, rpc, threads: int, say) -> CostTable:
    """The given cost table, or this model's grid profiled on the target (cached)."""
    if isinstance(given, CostTable):
        return given
    if given is not None:
        table = CostTable.load(given)
        if not table.complete:
            raise TargetError(f"{given}: the profile is unfinished; re-run vitsparse profile")
        return table
    geo = geometry_of(model)
    grid = Grid.for_geometry(
        geo.embed_dim,
        max(geo.num_heads),
        max(geo.head_dim),
        max(geo.mlp_dim),
        geo.num_patches + geo.num_prefix_tokens,
    )
    device = f"rpc-{rpc.key}" if rpc is not None else spec.device_type
    path = cache_dir() / "cost" / f"{spec.key}-{device}-t{threads}-{grid.name}.json"
    if path.exists() and CostTable.load(path).complete:  # checked, and repaired where disturbed
        say(f"[search] cost table: {path} (cached)")
    else:
        say(f"[search] profiling this model's shapes on the target into {path} (cached after)")
    return profile(spec, path, grid=grid, rpc=rpc, energy_seconds=0.0, progress=say)


def _write_outputs(report: SearchReport, out: Path) -> None:
    try:
        front_plot(report, out / "front.png")
    except ImportError as err:  # matplotlib is the plot extra
        report.notes.append(f"no front.png: {err}")
    write_text_atomic(out / "search.json", json.dumps(report.to_json(), indent=1) + "\n")
    write_text_atomic(out / "front.md", front_markdown(report))


def front_markdown(report: SearchReport) -> str:
    """The candidates as a markdown table, the front marked, and the chosen one."""
    unit = report.unit
    lines = [
        f"# Search: {report.model} on {report.device}",
        "",
        f"- budget: {report.budget['text']} = **{report.limit:.3f} {unit}** "
        f"(dense measured {report.dense['measured']:.3f} {unit}, fp32)",
        f"- candidates' precision: {report.precision}"
        + (
            ""
            if report.start is None
            else f" (unpruned: {report.start['measured']:.3f} {unit}, "
            f"{report.start['ratio_to_dense']:.2f} of dense)"
        ),
        f"- window: [{WINDOW[0]}, {WINDOW[1]}] of the budget; {len(report.candidates)} "
        f"candidates in {report.seconds:.0f} s",
    ]
    if report.chosen:
        lines.append(f"- chosen: {_describe(report.chosen, unit)}")
    lines += [
        "",
        f"| method | # | kept FLOPs | predicted {unit} | measured {unit} | error | top-1 | "
        "agreement | mean KL | within | front |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    front = {id(c) for c in pareto(report.candidates)}
    for c in report.candidates:
        top1 = "-" if c.get("top1") is None else f"{100 * c['top1']:.1f}%"
        lines.append(
            f"| {c['method']} | {c['iteration']} | {c['kept_flops']:.3f} | {c['predicted']:.3f} "
            f"| {c['measured']:.3f} | {100 * (c['predicted'] / c['measured'] - 1):+.1f}% | "
            f"{top1} | {100 * c['agreement']:.1f}% | {c['mean_kl']:.4f} | "
            f"{'yes' if c['within'] else ('under' if c['under'] else 'no')} | "
            f"{'*' if id(c) in front else ''} |"
        )
    lines += [""] + [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def pareto(candidates: list[dict]) -> list[dict]:
    """The candidates no other beats on both measured cost and quality."""
    good = [c for c in candidates if c["correct"]]
    return [
        c
        for c in good
        if not any(
            o["measured"] <= c["measured"]
            and _quality_key(o)[:2] >= _quality_key(c)[:2]
            and (o["measured"] < c["measured"] or _quality_key(o)[:2] > _quality_key(c)[:2])
            for o in good
        )
    ]


def front_plot(report: SearchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labelled = any(c.get("top1") is not None for c in report.candidates)
    for method in dict.fromkeys(c["method"] for c in report.candidates):
        rows = [c for c in report.candidates if c["method"] == method]
        ys = [100 * (c["top1"] if labelled else c["agreement"]) for c in rows]
        ax.plot([c["measured"] for c in rows], ys, "o-", label=method, alpha=0.8)
    ax.axvline(report.limit, color="k", ls="--", lw=1, label="budget")
    ax.axvline(report.dense["measured"], color="gray", ls=":", lw=1, label="dense")
    ax.set_xlabel(f"measured {report.budget['metric']} ({report.unit}) on {report.device}")
    ax.set_ylabel("top-1 (%)" if labelled else "top-1 agreement with dense (%)")
    ax.set_title(f"{report.model}: {report.budget['text']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(buf, dpi=110)
        buf.replace(path)
    finally:
        plt.close(fig)
        buf.unlink(missing_ok=True)


__all__ = ["METHODS", "WINDOW", "Journal", "SearchReport", "search"]
