"""Collective bytes of a compiled XLA program, read from its HLO text.

``collective_bytes(compiled.as_text())`` walks the optimized, SPMD-partitioned HLO module from
its ENTRY computation and adds up, per kind (all-gather, all-reduce, reduce-scatter,
all-to-all, collective-permute), the bytes each collective moves on ONE device:

    bytes of an op = the larger of its input and output buffers on one device
        (all-gather: the gathered result; reduce-scatter: the unreduced input, its result
        times the replica group's size; the others: their buffer, equal in and out)

The optimized HLO names operands without their shapes, so every size is read from the op's
result shape (and, for reduce-scatter, ``replica_groups``: ``{{0,1,2,3},...}`` or the iota
form ``[groups,size]<=[devices]``).

A collective inside a ``while`` body counts once per iteration: its bytes are multiplied by
the loop's trip count, and by the trip counts of the loops around that one. The trip count is
read, in this order, from

1. the ``known_trip_count`` XLA's loop analysis writes into the while's ``backend_config``
   (``lax.fori_loop`` and ``lax.scan`` loops get it), else
2. the largest integer scalar ``constant`` in the loop's condition computation (and the
   fusions it calls): the bound
   ``n`` of a ``step < n`` loop counting from 0 by 1, which for a loop that may stop early
   (the sampler's ``while_loop`` over response tokens ends when every sample has emitted EOS)
   is the upper bound, else
3. 1, counted in ``unknown_trip_counts`` so a caller can say the figure is a lower bound.

Both branches of a ``conditional`` are counted (an upper bound). Asynchronous collectives count
at their ``-done`` op (whose result is the output buffer), not at ``-start``. Collectives are
never inside fusions, so fused computations are not walked; ``call`` and ``async`` wrappers are.
The sizes are those of the partitioned program, i.e. per device, as the HLO shapes give them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

# Bytes per element of HLO primitive types (sub-byte types rounded as XLA packs them).
_TYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z0-9]*)?)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][a-z\-]*)\((.*)$")
_CALLEES = re.compile(
    r"\b(condition|body|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_INT_CONSTANT = re.compile(r"=\s*[su](?:8|16|32|64)\[\]\s*constant\((-?\d+)\)")


def shape_bytes(text: str) -> float:
    """Bytes of every array shape written in ``text`` (a result or operand list)."""
    total = 0.0
    for dtype, dims in _SHAPE.findall(text):
        size = _TYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
        if size is None:
            continue
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


@dataclasses.dataclass
class _Instruction:
    result: str
    opcode: str
    rest: str


@dataclasses.dataclass
class CollectiveBytes:
    """Per-device bytes by collective kind, loop trip counts applied."""

    by_kind: dict[str, float]
    unknown_trip_counts: int = 0

    @property
    def total(self) -> float:
        return sum(self.by_kind.values())

    def scaled(self, factor: float) -> CollectiveBytes:
        return CollectiveBytes({k: v * factor for k, v in self.by_kind.items()},
                               self.unknown_trip_counts)


def _parse(hlo_text: str) -> tuple[dict[str, list[_Instruction]], str]:
    """Computations by name (their instructions) and the ENTRY computation's name."""
    computations: dict[str, list[_Instruction]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match:
                current = match[1]
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if match:
            computations[current].append(_Instruction(*match.groups()))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text (pass compiled.as_text())")
    return computations, entry


def _group_size(attributes: str) -> int:
    """Devices in one replica group of a collective, from its ``replica_groups`` attribute."""
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", attributes)
    if iota:
        return int(iota[2])
    listed = re.search(r"replica_groups=\{\{([^}]*)\}", attributes)
    if listed:
        return len(listed[1].split(","))
    raise ValueError(f"no replica_groups in collective attributes: {attributes[:200]}")


def _trip_count(instruction: _Instruction, computations: dict[str, list[_Instruction]]
                ) -> int | None:
    match = re.search(r"backend_config=(\{.*\})\s*$", instruction.rest)
    if match:
        try:
            known = json.loads(match[1]).get("known_trip_count")
        except json.JSONDecodeError:
            known = None
        if known:
            return int(known["n"])
    # The condition and the fusions it calls (XLA often fuses the bound into the compare).
    pending = [dict(_CALLEES.findall(instruction.rest)).get("condition")]
    seen, constants = set(), []
    while pending:
        name = pending.pop()
        if name is None or name in seen:
            continue
        seen.add(name)
        for ins in computations.get(name, ()):
            constants += [int(c) for c in _INT_CONSTANT.findall(
                f"= {ins.result} {ins.opcode}({ins.rest}")]
            pending += [callee for _, callee in _CALLEES.findall(ins.rest)]
    return max(constants) if constants else None


def collective_bytes(hlo_text: str) -> CollectiveBytes:
    """Per-device collective bytes of an optimized HLO module (``compiled.as_text()``)."""
    computations, entry = _parse(hlo_text)
    totals = dict.fromkeys(KINDS, 0.0)
    unknown = 0

    def walk(name: str, multiplier: float, depth: int) -> None:
        nonlocal unknown
        if depth > 64:
            raise ValueError(f"HLO call graph deeper than 64 at {name}")
        for ins in computations.get(name, ()):
            base = ins.opcode.removesuffix("-done")
            if base in KINDS and not ins.opcode.endswith("-start"):
                moved = shape_bytes(ins.result)
                if base == "reduce-scatter":
                    moved *= _group_size(ins.rest)
                totals[base] += multiplier * moved
            if ins.opcode == "fusion":
                continue
            callees = dict(_CALLEES.findall(ins.rest))
            if ins.opcode == "while":
                trips = _trip_count(ins, computations)
                if trips is None:
                    unknown += 1
                    trips = 1
                walk(callees["body"], multiplier * trips, depth + 1)
                continue
            targets = [v for k, v in callees.items() if k != "to_apply"]
            branches = _BRANCHES.search(ins.rest)
            if branches:
                targets += [b.strip().lstrip("%") for b in branches[1].split(",") if b.strip()]
            for target in targets:
                walk(target, multiplier, depth + 1)

    walk(entry, 1.0, 0)
    return CollectiveBytes(totals, unknown)


def format_bytes(by_kind: dict[str, float]) -> str:
    """``all-gather 12.3 MB, all-reduce 0.4 MB`` (non-zero kinds only; ``none`` if all zero)."""
    parts = [f"{kind} {value / 1e6:.2f} MB" for kind, value in by_kind.items() if value]
    return ", ".join(parts) if parts else "none"
