"""Benchmark: contlearn's replica-batched online learning against a naive per-seed loop.

Measures learner-steps per second (replicas × steps / wall time, after warm-up, the median of
several repeats) on permuted MNIST at batch size 1, per learner (bp, l2, snp, cbp; SGD and
Adam), hidden width (three hidden layers of 100 or 2000) and number of replicas R. contlearn
runs through its real code path: ``OnlineAgent`` + stream + ``SupervisedLoop`` writing metrics to
a run store in a temporary folder, probes off, threads chosen as ``contlearn.run`` chooses them.
The naive baseline (``NaiveLearner``, scripts/naive_online.py) is what a researcher writes
without contlearn: one seed at a time, ``torch.nn.Sequential`` + ``torch.optim``, a per-unit
continual backprop, L2-Init's term added to the gradients, ReDo's window sums and resets; its
learner-steps per second do not depend on R (seeds run one after another). Naive and
contlearn repeats are interleaved so that load from other processes hits both alike. Timing
tools: scripts/bench_timing.py.

Table columns: ``th`` torch's intra-op threads, ``bw`` the threads learning in blocks runs
replicas on (``OnlineAgent.block_workers``; 1 where the agent steps one by one).

Also measured: the credit rules (``fa``, ``dfa``, ``sign-symmetry``, ``kolen-pollack``) against
a naive loop written for each (scripts/naive_credit.py) and against the roofline of the bytes
each moves, the reference-path rules' speed, the memory-bandwidth roofline of a width-2000
step, the cost of the default
probes and of the run store, and the peak RSS of a demo-sized run (docs/performance.md)::

    python scripts/bench_online.py --quick --json bench.json     # under 5 minutes
    python scripts/bench_online.py --json bench.json --scaling   # everything

(Over 400 lines: one benchmark script a reader runs and reads top to bottom.)
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_loops import LEARNERS, contlearn_loop, loop_runner, run_config
from bench_timing import (  # scripts/ is on sys.path
    Timed,
    copy_bandwidth,
    machine,
    peak_rss,
    time_calls,
)
from naive_credit import NaiveRuleLearner
from naive_online import NaiveLearner

from contlearn.loop.engine import ProbeSchedule, SupervisedLoop
from contlearn.probes.measures import DEFAULT_PROBES
from contlearn.running.config import resolve
from contlearn.scripting import parse_flags

#: credit rules with a fast path, each against its naive loop (bp learner, SGD)
FAST_RULES = ("fa", "dfa", "sign-symmetry", "kolen-pollack")
#: rules on the reference path: contlearn's speed alone (no naive loop written for them)
REFERENCE_RULES = (
    "weight-mirror",
    "symmetric-alignment",
    "activation-alignment",
    "information-alignment",
)
#: bytes per feedback weight a rule moves on top of backprop's 12 per weight: fa reads B in
#: the backward (and the update must then read W itself), Kolen–Pollack also writes B; sign
#: symmetry reads W (as backprop), dfa's D is outputs × units (not counted)
RULE_EXTRA_BYTES = {"fa": 4, "dfa": 0, "sign-symmetry": 0, "kolen-pollack": 8}
QUICK = {
    100: [
        "bp",
        "l2",
        "snp",
        "cbp",
        "bp-adam",
        "l2-adam",
        "cbp-adam",
        "l2-init",
        "redo",
        "redo-adam",
    ],
    2000: ["bp", "cbp", "bp-adam"],
}
QUICK_R = {100: [1, 32], 2000: [1]}
FULL_R = {100: [1, 8, 32], 2000: [1, 8, 32]}
#: Adam at width 2000 keeps 4 × 1.2 GB of state at R = 32, plus weight-sized temporaries: more
#: than this machine's 23 GB with the other rows alive, so those rows stop at R = 8.
FULL_R_ADAM_2000 = [1, 8]


@dataclass
class Args:
    """Arguments of the benchmark (each is also a command-line flag)."""

    quick: bool = False
    """fewer configurations and repeats (under 5 minutes)"""
    json: str = ""
    """write every figure to this JSON file"""
    repeats: int = 5
    """timed repeats per configuration (the median is reported); --quick uses 3"""
    seconds: float = 1.5
    """wall time of one timed repeat of one configuration"""
    scaling: bool = False
    """also measure how contlearn scales with width, depth and R (docs/performance.md)"""
    only: str = ""
    """comma-separated learner rows (e.g. bp-adam,cbp-adam): just those rows and the
    rooflines of bp / bp-adam among them (no credit rules, overheads or memory)"""


def bench_row(name: str, width: int, Rs: list[int], args: Args, tmp: Path) -> list[dict]:
    """Naive (one seed) and contlearn (each R) of one learner and width, interleaved."""
    warm = 200 if width <= 100 else 6
    cfg = resolve(run_config(name, width, 1))
    loops = {R: contlearn_loop(run_config(name, width, R), tmp) for R in Rs}
    timed = {R: Timed(loop_runner(loop), R, threads, warm) for R, (loop, threads) in loops.items()}
    naive = NaiveLearner(cfg, seed=0)
    base = Timed(naive.run, 1, loops[Rs[0]][1], warm)
    for _ in range(args.repeats):
        base.repeat(args.seconds)
        for t in timed.values():
            t.repeat(args.seconds)
    rows = []
    for R, t in timed.items():
        agent = loops[R][0].agent
        workers = agent.block_workers() if agent.block_ready(1) else 1
        rows.append(
            {
                "learner": name,
                "width": width,
                "R": R,
                "threads": t.threads,
                "block_workers": workers,
                "steps_per_s": t.median / R,
                "learner_steps_per_s": t.median,
                "naive_learner_steps_per_s": base.median,
                "naive_threads": base.threads,
                "ratio": t.median / base.median,
                "repeats": t.rates,
                "naive_repeats": base.rates,
            }
        )
        print(
            f"{name:>9} {width:>5} {R:>3} {t.threads:>2} {workers:>2} | {t.median / R:10.1f} "
            f"{t.median:12.0f} | {base.median:10.0f} | {t.median / base.median:6.1f}x",
            flush=True,
        )
    return rows


# --- roofline, probes and store, memory -------------------------------------------------------


def roofline(args: Args, tmp: Path) -> dict:
    """Width-2000 SGD steps per second against the machine's copy bandwidth, and CBP against
    BP at that width (repeats interleaved with BP's, so both see the same load).

    The issue's roofline: a batch-1 step moves every weight three times (4 bytes each): the
    forward pass reads it, the backward pass reads it, the update writes it (the update's read
    can share the backward's). Roofline steps/s = copy bandwidth / bytes. contlearn beats it
    where it fuses more (the input layer, which needs no backward pass, is updated in the next
    forward pass: one read and one write), and where weights stay in the last-level cache, so
    the strict roofline is also reported: every weight read once and written once (8 bytes),
    the least any step that updates every weight must move through memory.
    """
    loop, threads = contlearn_loop(run_config("bp", 2000, 1), tmp)
    timed = Timed(loop_runner(loop), 1, threads, 6)
    cbp_loop, _ = contlearn_loop(run_config("cbp", 2000, 1), tmp)
    cbp = Timed(loop_runner(cbp_loop), 1, threads, 6)
    weights = sum(p[0].numel() for p in loop.agent.net.params.values())
    fractions, bandwidths, ratios = [], [], []
    for _ in range(args.repeats):
        bandwidths.append(copy_bandwidth(threads))
        timed.repeat(args.seconds)
        cbp.repeat(args.seconds)
        fractions.append(timed.rates[-1] * 12 * weights / bandwidths[-1])
        ratios.append(cbp.rates[-1] / timed.rates[-1])
    bw = statistics.median(bandwidths)
    out = {
        "weights": weights,
        "bytes_per_step": 12 * weights,
        "copy_bandwidth_GBps": bw / 1e9,
        "roofline_steps_per_s": bw / (12 * weights),
        "steps_per_s": timed.median,
        "fraction": statistics.median(fractions),
        "fractions": fractions,
        "threads": threads,
        "strict_roofline_steps_per_s": bw / (8 * weights),
        "strict_fraction": statistics.median(fractions) * 8 / 12,
        "cbp_steps_per_s": cbp.median,
        "cbp_over_bp": statistics.median(ratios),
    }
    print(
        f"roofline (width 2000, bp, R=1): copy {bw / 1e9:.1f} GB/s, {12 * weights / 1e6:.0f} MB"
        f"/step -> {out['roofline_steps_per_s']:.0f} steps/s; achieved {timed.median:.0f} "
        f"steps/s = {out['fraction']:.0%} of the roofline ({out['strict_fraction']:.0%} of "
        f"the strict one, {8 * weights / 1e6:.0f} MB/step); cbp {cbp.median:.0f} steps/s = "
        f"{out['cbp_over_bp']:.2f} x bp (interleaved)",
        flush=True,
    )
    return out


#: bytes per weight of an Adam step at batch 1: the weights as SGD's roofline counts them (12:
#: forward read, backward read, update write) and Adam's state, each read and written once
#: (m, v and the per-element counts: 24)
ADAM_BYTES = 12 + 24


def adam_roofline(args: Args, tmp: Path) -> dict:
    """Width-2000 Adam steps per second (bp-adam, R = 1) against the copy-bandwidth roofline
    of :data:`ADAM_BYTES` per weight (Adam's moments and counts counted)."""
    loop, threads = contlearn_loop(run_config("bp-adam", 2000, 1), tmp)
    timed = Timed(loop_runner(loop), 1, threads, 6)
    weights = sum(p[0].numel() for p in loop.agent.net.params.values())
    fractions, bandwidths = [], []
    for _ in range(args.repeats):
        bandwidths.append(copy_bandwidth(threads))
        timed.repeat(args.seconds)
        fractions.append(timed.rates[-1] * ADAM_BYTES * weights / bandwidths[-1])
    bw = statistics.median(bandwidths)
    out = {
        "backend": loop.agent.backend,
        "bytes_per_step": ADAM_BYTES * weights,
        "copy_bandwidth_GBps": bw / 1e9,
        "roofline_steps_per_s": bw / (ADAM_BYTES * weights),
        "steps_per_s": timed.median,
        "fraction": statistics.median(fractions),
        "fractions": fractions,
        "threads": threads,
    }
    print(
        f"adam roofline (width 2000, bp-adam, R=1) [{out['backend']}]: copy {bw / 1e9:.1f} GB/s,"
        f" {ADAM_BYTES * weights / 1e6:.0f} MB/step -> {out['roofline_steps_per_s']:.0f} "
        f"steps/s; achieved {timed.median:.0f} steps/s = {out['fraction']:.0%} of the roofline",
        flush=True,
    )
    return out


def credit_rows(args: Args, tmp: Path) -> list[dict]:
    """Each credit rule with a fast path against its naive loop at width 100, R = 32
    (interleaved), the same at width 2000, R = 1 against the roofline of the bytes the rule
    moves (12 per weight as backprop, plus :data:`RULE_EXTRA_BYTES` per weight of layers 2 …
    output, which have feedback), and the reference-path rules' speed at width 100, R = 32."""
    rows = []
    for rule in FAST_RULES + REFERENCE_RULES:
        for width, R in ((100, 32), (2000, 1)):
            if rule in REFERENCE_RULES and width == 2000:
                continue
            config = {**run_config("bp", width, R), "credit": rule}
            loop, threads = contlearn_loop(config, tmp)
            warm = 200 if width <= 100 else 6
            timed = Timed(loop_runner(loop), R, threads, warm)
            naive = None
            if rule in FAST_RULES:
                cfg = resolve(run_config("bp", width, 1))
                naive = Timed(NaiveRuleLearner(cfg, 0, rule).run, 1, threads, warm)
            bandwidths = []
            for _ in range(args.repeats):
                if naive is not None:
                    naive.repeat(args.seconds)
                timed.repeat(args.seconds)
                if width == 2000:
                    bandwidths.append(copy_bandwidth(threads))
            params = loop.agent.net.params
            weights = sum(p[0].numel() for p in params.values())
            feedback = sum(p[0].numel() for k, p in list(params.items())[2:] if "weight" in k)
            row = {
                "rule": rule,
                "width": width,
                "R": R,
                "backend": loop.agent.backend,
                "learner_steps_per_s": timed.median,
                "repeats": timed.rates,
            }
            if naive is not None:
                row.update(
                    naive_learner_steps_per_s=naive.median, ratio=timed.median / naive.median
                )
            if bandwidths:
                moved = 12 * weights + RULE_EXTRA_BYTES[rule] * feedback
                bw = statistics.median(bandwidths)
                row.update(
                    bytes_per_step=moved,
                    copy_bandwidth_GBps=bw / 1e9,
                    roofline_steps_per_s=bw / moved,
                    fraction=timed.median * moved / bw,
                )
            rows.append(row)
            naive_text = (
                f"naive {row['naive_learner_steps_per_s']:8.0f} = {row['ratio']:5.1f}x"
                if naive
                else "(no naive loop)"
            )
            roof = (
                f", {row['fraction']:.0%} of the roofline ({moved / 1e6:.0f} MB/step)"
                if bandwidths
                else ""
            )
            print(
                f"credit {rule:>21} width {width:>4} R {R:>2} [{row['backend']}]: "
                f"{timed.median:9.0f} learner-steps/s; {naive_text}{roof}",
                flush=True,
            )
    return rows


def _interleaved_tasks(
    loops: dict[str, tuple[SupervisedLoop, dict]],
) -> dict[str, tuple[float, float]]:
    """Each loop runs one whole task (one ``run`` call, as a run makes: concurrent probes are
    collected at the next task start), the loops taking turns so that the machine's load hits
    all alike; per loop (wall time, time inside its spied-on calls)."""
    out = {}
    for k, (loop, spy) in loops.items():
        spy["t"] = 0.0
        start = time.perf_counter()
        loop.run(loop.stream.step + loop.stream.steps_per_task)
        out[k] = (time.perf_counter() - start, spy.get("t", 0.0))
    return out


#: the runs whose probe and store costs are measured: the default demo (scripts/demo.py: cbp,
#: 3 seeds, the stream's 10,000 examples per task, probes on 500 inputs; the target's run) and
#: the default run (one seed, probes on 2000 inputs)
OVERHEAD_RUNS = {
    "demo": ({"stream": "permuted-mnist", "learner": "cbp", "seeds": 3, "probes": "none"}, 500),
    "default": ({"stream": "permuted-mnist", "probes": "none"}, 2000),
}


def overheads(args: Args, tmp: Path, run: str = "demo") -> dict:
    """The default probes (every task start) and the run store on one of
    :data:`OVERHEAD_RUNS`: whole tasks with and without each, the loops taking turns task by
    task (medians of the rounds' ratios, 20 rounds or more). Probes run as in a run (on the
    probe thread while learning goes on) and, for comparison, in line; the store's cost is also
    timed inside its calls."""
    base, probe_size = OVERHEAD_RUNS[run]
    store_spy = {"t": 0.0}
    schedule = ProbeSchedule(tuple(DEFAULT_PROBES), 0, probe_size)
    probed = contlearn_loop(base, tmp, probes=schedule)[0]
    inline = contlearn_loop(base, tmp, probes=schedule)[0]
    inline._concurrent = False
    stored, threads = contlearn_loop(base, tmp)
    stored.emit = time_calls(stored.emit, store_spy)
    bare = contlearn_loop(base, tmp, store=False)[0]
    torch.set_num_threads(threads)
    loops = {
        "probes": (probed, {}),
        "probes_inline": (inline, {}),
        "store": (stored, store_spy),
        "bare": (bare, {}),
    }
    times: dict[str, list[float]] = {k: [] for k in loops}
    store_inside = []
    for loop, _ in loops.values():  # warm-up: the first task, with its probes
        loop.run(loop.stream.steps_per_task)
    for _ in range(max(20, 4 * args.repeats)):
        for key, (wall, spent) in _interleaved_tasks(loops).items():
            times[key].append(wall)
            if key == "store":
                store_inside.append(spent / (wall - spent))
    med = {k: statistics.median(v) for k, v in times.items()}

    def paired(key: str, base: str) -> float:
        """Median over rounds of one task's time against the other loop's in that round (the
        machine's speed drifts between rounds; within one it hits both alike)."""
        return statistics.median(a / b - 1 for a, b in zip(times[key], times[base], strict=True))

    out = {
        "probes_ab": paired("probes", "store"),
        "probes_inline_ab": paired("probes_inline", "store"),
        "store_ab": paired("store", "bare"),
        "store_inside": statistics.median(store_inside),
        "task_seconds": med,
        "threads": threads,
        "run": run,
        "config": base,
        "probe_size": probe_size,
        "concurrent": probed._concurrent,
    }
    print(
        f"probes (default schedule, {run} run): {out['probes_ab']:+.1%} of the run's time "
        f"(in line: {out['probes_inline_ab']:+.1%}); run store: "
        f"+{out['store_inside']:.2%} (A/B: {out['store_ab']:+.1%})",
        flush=True,
    )
    return out


def scaling(args: Args, tmp: Path) -> list[dict]:
    """contlearn's learner-steps per second (bp and cbp) as width, depth and R vary."""
    grid = [("width", w, 3, 1) for w in (100, 250, 500, 1000, 2000)]
    grid += [("depth", 100, d, 1) for d in (1, 2, 3, 5, 8)]
    grid += [("depth", 100, d, 32) for d in (1, 2, 3, 5, 8)]
    grid += [("R", 100, 3, R) for R in (1, 2, 4, 8, 16, 32, 64, 128)]
    grid += [("R", 1000, 3, R) for R in (1, 2, 4, 8)]
    rows = []
    for axis, width, depth, R in grid:
        for name in ("bp", "cbp"):
            config = {**run_config(name, width, R), "hidden": ",".join([str(width)] * depth)}
            loop, threads = contlearn_loop(config, tmp)
            t = Timed(loop_runner(loop), R, threads, 100 if width * R <= 3200 else 5)
            for _ in range(max(2, args.repeats - 2)):
                t.repeat(args.seconds / 2)
            rows.append(
                {
                    "axis": axis,
                    "learner": name,
                    "width": width,
                    "depth": depth,
                    "R": R,
                    "threads": threads,
                    "learner_steps_per_s": t.median,
                }
            )
            print(
                f"scaling {axis:>5}: {name:>3} width {width:>4} depth {depth} R {R:>3}: "
                f"{t.median:10.0f} learner-steps/s",
                flush=True,
            )
    return rows


def targets(
    rows: list[dict],
    roof: dict,
    over: dict,
    mem: dict,
    credit: list[dict] | None = None,
    adam_roof: dict | None = None,
) -> dict:
    """The performance targets of docs/performance.md, each with its measured value (those
    whose measurement was not made, with ``--only``, are left out)."""

    def ratio(name: str, width: int, R: int) -> float | None:
        found = [r for r in rows if (r["learner"], r["width"], r["R"]) == (name, width, R)]
        return found[0]["ratio"] if found else None

    measured = {
        "cbp_w100_R32_vs_naive >= 20": ratio("cbp", 100, 32),
        "bp_w100_R32_vs_naive >= 20": ratio("bp", 100, 32),
        "bp-adam_w100_R32_vs_naive >= 20": ratio("bp-adam", 100, 32),
        "l2-adam_w100_R32_vs_naive >= 20": ratio("l2-adam", 100, 32),
        "cbp-adam_w100_R32_vs_naive >= 20": ratio("cbp-adam", 100, 32),
        "bp_w2000_R1_roofline_fraction >= 0.6": roof.get("fraction"),
        "bp-adam_w2000_R1_roofline_fraction >= 0.6": (adam_roof or {}).get("fraction"),
        "cbp_w2000_over_bp >= 0.85": roof.get("cbp_over_bp"),
        "probes_overhead < 0.05": over.get("probes_ab"),
        "store_overhead < 0.02": over.get("store_inside"),
        "peak_rss_MB < 1536": mem.get("peak_rss_MB"),
    }
    checks = {k: v for k, v in measured.items() if v is not None}
    for r in credit or []:
        if "ratio" in r and r["width"] == 100:
            checks[f"{r['rule']}_w100_R32_vs_naive >= 20"] = r["ratio"]
        if "fraction" in r:
            checks[f"{r['rule']}_w2000_R1_roofline_fraction >= 0.6"] = r["fraction"]
    out = {}
    for key, value in checks.items():
        bound = float(key.split()[-1])
        ok = value >= bound if ">=" in key else value < bound
        out[key] = {"value": value, "holds": ok}
        print(f"target {key:<40} {value:10.3f}  {'holds' if ok else 'DOES NOT HOLD'}")
    return out


def parse_args() -> Args:
    """Command-line flags from the fields of :class:`Args`."""
    args = parse_flags(Args, __doc__.splitlines()[0])
    if args.quick and args.repeats == Args.repeats:
        args.repeats = 3
    return args


def main() -> None:
    """Every measurement, a table, the targets, and the JSON file."""
    args = parse_args()
    result: dict = {"args": dataclasses.asdict(args), "machine": machine(), "rows": []}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if args.only:
            return only(args, result, tmp)
        result["memory"] = peak_rss(6 if args.quick else 30, tmp)
        print(
            f"peak RSS, demo-sized run ({result['memory']['tasks']} tasks): "
            f"{result['memory']['peak_rss_MB']:.0f} MB",
            flush=True,
        )
        print(
            f"{'learner':>9} {'width':>5} {'R':>3} {'th':>2} {'bw':>2} | {'steps/s':>10} "
            f"{'learner-st/s':>12} | {'naive':>10} | {'ratio':>7}"
        )
        for width, names in (QUICK if args.quick else {w: list(LEARNERS) for w in FULL_R}).items():
            for name in names:
                Rs = (QUICK_R if args.quick else FULL_R)[width]
                if not args.quick and width == 2000 and name.endswith("adam"):
                    Rs = FULL_R_ADAM_2000
                result["rows"] += bench_row(name, width, Rs, args, tmp)
        result["roofline"] = roofline(args, tmp)
        result["adam_roofline"] = adam_roofline(args, tmp)
        result["credit"] = credit_rows(args, tmp)
        result["overheads"] = overheads(args, tmp)
        result["overheads_default_run"] = overheads(args, tmp, "default")
        if args.scaling:
            result["scaling"] = scaling(args, tmp)
    result["targets"] = targets(
        result["rows"],
        result["roofline"],
        result["overheads"],
        result["memory"],
        result["credit"],
        result["adam_roofline"],
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def only(args: Args, result: dict, tmp: Path) -> None:
    """``--only``: the named learner rows (at the widths the mode has them) and the rooflines
    among them, the targets they decide, and the JSON file."""
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(LEARNERS))
    if unknown:
        raise SystemExit(f"--only: unknown learner rows {unknown}; known: {sorted(LEARNERS)}")
    plan = QUICK if args.quick else {w: list(LEARNERS) for w in FULL_R}
    for width, listed in plan.items():
        for name in (n for n in listed if n in names):
            Rs = (QUICK_R if args.quick else FULL_R)[width]
            result["rows"] += bench_row(name, width, Rs, args, tmp)
    roof = roofline(args, tmp) if "bp" in names else {}
    adam = adam_roofline(args, tmp) if "bp-adam" in names else {}
    result.update(roofline=roof, adam_roofline=adam)
    result["targets"] = targets(result["rows"], roof, {}, {}, None, adam)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
