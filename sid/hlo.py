"""What a compiled step sends between devices, read from XLA's HLO text: the SPMD partitioner's output for a lowered
function, and every collective in it with its dtype, shape and bytes, the JAX op it partitions and how often it
runs. `bench/step_collectives.py` sums these into traffic per step; `tests/test_mesh.py` checks layouts with them."""

from __future__ import annotations

import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import jax

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4}
DTYPE_BYTES |= {"f64": 8, "s64": 8, "u64": 8}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(")
_COLLECTIVE = re.compile(rf"= (.*?) ({'|'.join(KINDS)})(?:-start)?\(")
_WHILE = re.compile(r" while\(.*body=%([\w.\-]+)")
_CONDITION = re.compile(r"condition=%([\w.\-]+)")
_INT_CONSTANT = re.compile(r"= s32\[\] constant\((\d+)\)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLEES = re.compile(r"(?:calls|to_apply|branch_computations)=(\{[^}]*\}|%[\w.\-]+)")
_NAME = re.compile(r"%([\w.\-]+)")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_OP_NOISE = re.compile(r"^jit\([^)]*\)/|(?:while/body|closed_call|checkpoint)/")


@dataclass(frozen=True)
class Collective:
    kind: str
    """One of KINDS."""
    dtype: str
    """Element type of its (first) result."""
    shape: tuple[int, ...]
    """Per-device shape of its (first) result."""
    bytes: int
    """Per-device output bytes of one execution (all results)."""
    runs: int
    """Executions per run of the entry computation (product of the trip counts of the loops around it)."""
    loops: int
    """How many while loops it sits in."""
    op_name: str = ""
    """The HLO's op_name metadata: the JAX op it partitions, with the jit and loop-body scopes it was traced in."""

    @property
    def op(self) -> str:
        """`op_name` without the jit, loop-body, closed-call and checkpoint scopes."""
        return _OP_NOISE.sub("", self.op_name)


def partitioned_hlo(lowered: jax.stages.Lowered) -> tuple[jax.stages.Compiled, str]:
    """Compile `lowered`, and the HLO text that XLA's SPMD partitioner made of it: every collective it placed, in
    the dtypes it chose. (Backends rewrite the compiled HLO after that; the CPU backend widens bfloat16 collectives
    to float32, so on simulated devices only this text tells a bfloat16 weight gather from a float32 one.)"""
    with tempfile.TemporaryDirectory() as tmp:
        compiled = lowered.compile({"xla_dump_to": tmp, "xla_dump_hlo_pass_re": "spmd-partitioning"})
        dumps = sorted(Path(tmp).glob("*after_spmd-partitioning*.txt"))
        if len(dumps) != 1:
            raise RuntimeError(
                f"expected one HLO dump after XLA's spmd-partitioning pass, found {[d.name for d in dumps]}: either "
                "XLA did not compile (a persistent compilation cache hit: unset JAX_COMPILATION_CACHE_DIR) or this "
                "XLA names the pass differently"
            )
        return compiled, dumps[0].read_text()


def shape_bytes(text: str) -> int:
    """Bytes of the array shapes in `text` (an HLO result type, tuples included)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in _dims(dims):
            n *= d
        total += DTYPE_BYTES.get(dtype, 4) * n
    return total


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def hlo_collectives(hlo: str) -> list[Collective]:
    """Every collective reachable from the entry computation of an HLO module's text, with how often it runs."""
    bodies: dict[str, list[str]] = defaultdict(list)
    entry, current = None, None
    for line in hlo.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = head.group(1)
            entry = current if line.startswith("ENTRY") else entry
        elif current is not None:
            bodies[current].append(_COMMENT.sub("", line))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    out: list[Collective] = []

    def visit(name: str, runs: int, loops: int) -> None:
        for line in bodies.get(name, ()):
            if m := _COLLECTIVE.search(line):
                result = _SHAPE.search(m.group(1))
                dtype, shape = (result[1], _dims(result[2])) if result else ("", ())
                op_name = _OP_NAME.search(line)
                out.append(
                    Collective(
                        m.group(2), dtype, shape, shape_bytes(m.group(1)), runs, loops, op_name[1] if op_name else ""
                    )
                )
            if m := _WHILE.search(line):
                visit(m.group(1), runs * trip_count(line, bodies), loops + 1)
            else:
                for group in _CALLEES.findall(line):
                    for callee in _NAME.findall(group):
                        visit(callee, runs, loops)

    visit(entry, 1, 0)
    return out


def trip_count(while_line: str, bodies: dict[str, list[str]]) -> int:
    """A while loop's trip count: XLA's annotation (compiled HLO), else read off its condition, which for a
    `lax.scan` (a counter from 0) is `counter < N` with a constant N (HLO straight out of the partitioner)."""
    if m := _TRIP_COUNT.search(while_line):
        return int(m.group(1))
    cond = _CONDITION.search(while_line)
    lines = bodies.get(cond.group(1), []) if cond else []
    constants = [int(c) for line in lines for c in _INT_CONSTANT.findall(line)]
    if len(constants) == 1 and any(line.lstrip().startswith("ROOT") and "direction=LT" in line for line in lines):
        return constants[0]
    raise ValueError(f"while loop without a known trip count: {while_line.strip()[:200]}")
