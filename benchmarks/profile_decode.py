"""Where the time of one decode step and of one GRPO update goes on CPU, per XLA op.

Method: ``jax.profiler`` traces the warm call; XLA's CPU runtime records one event per
executed op (thunk) with its HLO name. The optimized HLO of every program (``--xla_dump_to``,
added to ``XLA_FLAGS`` by this script) says, per op, the stack frame that emitted it; each
op's time is charged to the innermost *project* function on that stack (``rms_norm``,
``materialized``, ``Decoder.logits``, ``choose_tokens``, ...) and to a kind read off the op:
``matmul`` (a dot), ``slice copy`` (a dynamic slice materialised, e.g. a layer's weights cut
out of the stacked ``[L, ...]`` array by the layer scan), ``copy/transpose``, ``in-place
write`` (dynamic-update-slice) and ``elementwise/reduce`` (every other fusion). Loops
(``while``) are containers: their body ops are counted, not the loop itself.

XLA's CPU runtime runs independent ops concurrently on its thread pool, so op times summed
(``op ms``) can exceed the wall time; ``busy`` = op time / wall time says how many threads
were working on average.

Shapes: ``decode`` samples G responses of R new tokens for each of B prompts of P tokens
(``--batch``, default 1: a GRPO rollout's group; an evaluation is B prompts x G = 1) with the
SmolLM2-135M-Instruct weights (fp32; the default model directory is converted from the
GGUF asset as ``benchmarks.sampling`` does), per decode step = the decode program's time / R;
``update`` is one ``Trainer.grpo_step`` on the same model at (P, R, G) (random responses and
advantages, as ``benchmarks.train_step``).

Run: ``python -m benchmarks.profile_decode [--parts decode update] [--shape 512x128x8]``
(``--repeats``: warm calls timed without the profiler, median reported).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time
from pathlib import Path

DUMP_FLAGS = "--xla_dump_to={} --xla_dump_hlo_as_text"
KINDS = ("matmul", "slice copy", "copy/transpose", "in-place write", "elementwise/reduce")
_FRAME = re.compile(r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}")
_LOCATION = re.compile(r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)")
_NAMED = re.compile(r'^(\d+) "(.*)"$')
_OP = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")


# ----------------------------------------------------------------------------- HLO


def parse_hlo(text: str) -> dict[str, tuple[str, str]]:
    """Optimized HLO text -> {op name: (project function, kind)} for the ops of every
    computation (containers like ``while`` map to kind ``None``)."""
    tables = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
    section = None
    ops, with_dot, computation = {}, set(), None
    for line in text.splitlines():
        if line.startswith("%") or line.startswith("ENTRY"):
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
        if " dot(" in line:
            with_dot.add(computation)
        if line in tables:
            section = line
            continue
        if section and line and not line[0].isdigit():
            section = None
        if section in ("FileNames", "FunctionNames") and (m := _NAMED.match(line)):
            tables[section][m[1]] = m[2]
        elif section == "FileLocations" and (m := _LOCATION.match(line)):
            tables[section][m[1]] = (m[2], m[3])
        elif section == "StackFrames" and (m := _FRAME.match(line)):
            tables[section][m[1]] = (m[2], m[3])
        elif m := _OP.match(line):
            frame = re.search(r"stack_frame_id=(\d+)", line)
            op_name = re.search(r'op_name="([^"]*)"', line)
            calls = re.search(r"calls=%([\w.\-]+)", line)
            ops[m[1]] = (frame[1] if frame else None, op_name[1] if op_name else "",
                         calls[1] if calls else None)

    def function(frame: str | None) -> str:
        seen = set()
        while frame and frame not in seen:  # innermost frame in a project file
            seen.add(frame)
            location, parent = tables["StackFrames"].get(frame, (None, None))
            file_id, function_id = tables["FileLocations"].get(location, (None, None))
            if "reczero_jax/" in tables["FileNames"].get(file_id, ""):
                return tables["FunctionNames"][function_id].replace(".<locals>", "")
            frame = parent
        return "(no project frame)"

    return {name: (function(frame), op_kind(name, op_name, calls in with_dot))
            for name, (frame, op_name, calls) in ops.items()}


def op_kind(name: str, op_name: str, fuses_dot: bool = False) -> str | None:
    """The kind of op ``name`` (None: a loop or call, whose body ops are counted instead);
    ``fuses_dot``: it is a fusion whose computation holds a dot (some carry no metadata)."""
    last = op_name.rsplit("/", 1)[-1]
    if name.split(".")[0] in ("while", "call", "conditional"):
        return None
    if last == "dot_general" or fuses_dot:
        return "matmul"
    if "dynamic-update-slice" in name:
        return "in-place write"
    if name.startswith("dynamic-slice") or last == "dynamic_slice":
        return "slice copy"
    if "copy" in name or "transpose" in name:
        return "copy/transpose"
    return "elementwise/reduce"


def load_dumps(dump_dir: str) -> dict[str, dict[str, tuple[str, str]]]:
    """{program id (as the trace writes it): parsed HLO} of the optimized modules dumped."""
    programs = {}
    for path in glob.glob(os.path.join(dump_dir, "module_*after_optimizations.txt")):
        program_id = str(int(os.path.basename(path).split(".")[0].split("_")[1]))
        programs[program_id] = parse_hlo(Path(path).read_text())
    return programs


# ----------------------------------------------------------------------------- trace


def traced(fn, trace_dir: str):
    """Run ``fn`` once under the profiler: (wall s, the trace's per-op events)."""
    import jax

    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    jax.block_until_ready(fn())
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                  key=os.path.getmtime)[-1]
    events = []
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats:
                    events.append((str(stats.get("program_id")), stats["hlo_op"],
                                   event.duration_ns))
    return wall, events


def breakdown(events, programs, per: int) -> tuple[list[tuple[str, str, float, float]], float]:
    """Rows (function, kind, ms per unit, calls per unit), largest first, and the total op
    ms per unit; ``per`` units (decode steps) in the trace."""
    times, calls = collections.Counter(), collections.Counter()
    for program, op, duration in events:
        function, kind = programs.get(program, {}).get(op, ("(not in the dump)", "elementwise/reduce"))
        if kind is None:
            continue
        times[function, kind] += duration / 1e6 / per
        calls[function, kind] += 1 / per
    rows = [(f, k, ms, calls[f, k]) for (f, k), ms in times.most_common()]
    return rows, sum(times.values())


def breakdown_table(rows, total_ms: float, wall_ms: float, top: int = 14) -> str:
    from benchmarks.common import markdown_table

    shown = rows[:top]
    rest = sum(ms for _, _, ms, _ in rows[top:])
    lines = [[f, k, f"{ms:.2f}", f"{100 * ms / total_ms:.1f}%", f"{c:.0f}"] for f, k, ms, c in shown]
    if rest:
        lines.append(["(the rest)", "", f"{rest:.2f}", f"{100 * rest / total_ms:.1f}%", ""])
    by_kind = collections.Counter()
    for _, kind, ms, _ in rows:
        by_kind[kind] += ms
    summary = ", ".join(f"{k} {100 * by_kind[k] / total_ms:.0f}%" for k in KINDS if by_kind[k])
    return "\n".join([
        markdown_table(["function", "kind", "op ms", "of op time", "ops"], lines),
        f"\nop time {total_ms:.1f} ms, wall {wall_ms:.1f} ms (busy {total_ms / wall_ms:.2f} "
        f"threads). By kind: {summary}."])


# ----------------------------------------------------------------------------- parts


def decode_part(model, shape, repeats: int, trace_dir: str):
    """(warm seconds of the decode program, its trace) for B prompts of P tokens."""
    import jax
    import numpy as np
    from flax import nnx

    from benchmarks.common import time_call
    from reczero_jax import sampling

    ids = np.random.RandomState(0).randint(100, model.config.vocab_size,
                                           (shape.batch, shape.prompt)).astype(np.int32)
    graphdef, state = nnx.split(model)
    prompt_ids, prompt_mask, lengths = sampling._prepare_prompts(
        ids, np.ones_like(ids), length=shape.prompt, pad_id=0, copies=1, mesh=None,
        rules=model.axis_rules)
    prefix, last_logits = sampling._prefill(graphdef, state, prompt_ids, prompt_mask)

    def decode():
        return sampling._decode(graphdef, state, prefix, last_logits, lengths, jax.random.key(0),
                                num_samples=shape.samples, max_new_tokens=shape.new_tokens,
                                temperature=1.0, top_k=0, top_p=1.0, eos_ids=(), pad_id=0,
                                shared_prompt=True)

    timing = time_call(decode, repeats=repeats)
    return timing, traced(decode, trace_dir)


def update_part(model_dir: Path, shape, repeats: int, trace_dir: str):
    """(warm seconds of one GRPO update, its trace)."""
    from benchmarks.common import time_call
    from benchmarks.train_step import jax_arm, make_batch
    from reczero_jax.models.hf import read_config

    batch = make_batch(shape, read_config(model_dir).vocab_size)
    step, _, _ = jax_arm(model_dir, shape, batch, "shared")
    timing = time_call(step, repeats=repeats)
    return timing, traced(lambda: step() or 0, trace_dir)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["decode"], choices=["decode", "update"])
    parser.add_argument("--shape", default="512x128x8", help="PxRxG")
    parser.add_argument("--batch", type=int, default=1,
                        help="prompts per decode (decode part; the update takes one)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="warm calls timed without the profiler (median reported)")
    parser.add_argument("--model-dir", type=Path, default=Path("artifacts/smollm2"))
    parser.add_argument("--top", type=int, default=14, help="rows per table")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="profile_") as work:
        return profile(args, work)


def profile(args, work: str) -> str:
    """The report of ``main``; ``work`` holds the HLO dump and the traces."""
    # Before jax starts: the optimized HLO of each program, to name the traced ops.
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                     DUMP_FLAGS.format(work + "/hlo")]))

    from benchmarks.common import describe_machine, emit_report, measure_ceilings
    from benchmarks.sampling import FP32_BYTES, Shape, ensure_model_dir, matmul_weights
    from reczero_jax.models.hf import from_pretrained

    shape = Shape.parse(args.shape, args.batch)
    model_dir = ensure_model_dir(args.model_dir)
    ceilings = measure_ceilings()
    sections = [f"Profile, SmolLM2-135M fp32, {shape} ({describe_machine()}); ceilings in "
                f"this run: {ceilings.describe()}; XLA_FLAGS={os.environ['XLA_FLAGS']!r}."]
    for part in args.parts:
        trace_dir = f"{work}/trace_{part}"
        if part == "decode":
            model = from_pretrained(model_dir)
            timing, (wall, events) = decode_part(model, shape, args.repeats, trace_dir)
            per, unit = shape.new_tokens, "decode step"
            weight_bytes = FP32_BYTES * matmul_weights(model.config)
            roofline = (f" Weight-read roofline: {weight_bytes / 1e6:.0f} MB at the copy rate "
                        f"= {1e3 * weight_bytes / ceilings.copy_bytes:.1f} ms per step.")
        else:
            timing, (wall, events) = update_part(model_dir, Shape.parse(args.shape, 1),
                                                 args.repeats, trace_dir)
            per, unit, roofline = 1, "update", ""
        rows, total = breakdown(events, load_dumps(work + "/hlo"), per)
        sections.append(
            f"## {part}\n\nWarm {unit}: {1e3 * timing.median_s / per:.1f} ms (median of "
            f"{len(timing.warm_s)}: {', '.join(f'{1e3 * t / per:.1f}' for t in timing.warm_s)}"
            f"; the traced call {1e3 * wall / per:.1f}).{roofline} Per {unit}:\n\n"
            + breakdown_table(rows, total, 1e3 * wall / per, args.top))
        print(sections[-1], flush=True)
    return emit_report("\n\n".join(sections), args.out)

if __name__ == "__main__":
    main()
