"""Reading collectives out of HLO text (sid.hlo), against a hand-written module whose answer is known: each
collective's kind, dtype, shape and bytes, and how often it runs inside nested loops."""

import pytest

from sid.hlo import Collective, hlo_collectives

HLO = """HloModule m

%add (a: bf16[], b: bf16[]) -> bf16[] {
  ROOT %s = bf16[] add(bf16[] %a, bf16[] %b)
}

%inner_body (p: (s32[], bf16[16])) -> (s32[], bf16[16]) {
  %ar = bf16[16]{0} all-reduce-start(bf16[16]{0} %y), to_apply=%add
  %done = bf16[16]{0} all-reduce-done(bf16[16]{0} %ar)
}

%outer_body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %ag = f32[4,8]{1,0} all-gather(f32[2,8]{1,0} %x), metadata={op_name="jit(f)/while/body/jvp()/dot_general"}
  %w2 = (s32[], bf16[16]) while(%t), condition=%c, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
}

%branch (p: f32[2]) -> f32[2] {
  %cp = f32[2]{0} collective-permute(f32[2]{0} %p), source_target_pairs={{0,1},{1,0}}
}

%unreachable (p: f32[2]) -> f32[2] {
  %never = f32[2]{0} all-reduce(f32[2]{0} %p), to_apply=%add
}

ENTRY %main (a: f32[2,8]) -> f32[4,8] {
  %w = (s32[], f32[4,8]) while(%init), condition=%c, body=%outer_body, backend_config={"known_trip_count":{"n":"2"}}
  %a2a = (f32[2,8]{1,0}, /*index=1*/s32[3]{0}) all-to-all(f32[2,8]{1,0} %x, s32[3]{0} %y), dimensions={0}
  %cond = f32[2] conditional(pred[] %q, f32[2] %u, f32[2] %v), branch_computations={%branch, %branch}
}
"""

EXPECTED = [
    Collective("all-gather", "f32", (4, 8), 4 * 8 * 4, runs=2, loops=1, op_name="jit(f)/while/body/jvp()/dot_general"),
    Collective("all-reduce", "bf16", (16,), 16 * 2, runs=2 * 3, loops=2),  # the -start counted, the -done not
    Collective("all-to-all", "f32", (2, 8), 2 * 8 * 4 + 3 * 4, runs=1, loops=0),  # both results' bytes
    Collective("collective-permute", "f32", (2,), 2 * 4, runs=1, loops=0),  # each of the two branches
    Collective("collective-permute", "f32", (2,), 2 * 4, runs=1, loops=0),
]


def by_kind(collectives: list[Collective]) -> list[Collective]:
    return sorted(collectives, key=lambda c: c.kind)


def test_collectives_weighted_by_loop_trip_counts():
    got = by_kind(hlo_collectives(HLO))
    assert got == EXPECTED
    assert got[0].op == "jvp()/dot_general"  # without the jit and loop-body scopes
    with pytest.raises(ValueError, match="no ENTRY"):
        hlo_collectives(HLO.replace("ENTRY ", ""))


def test_trip_counts_of_partitioner_output_come_from_the_scan_condition():
    unannotated = HLO.replace(', backend_config={"known_trip_count":{"n":"2"}}', "")
    with pytest.raises(ValueError, match="known trip count"):
        hlo_collectives(unannotated)
    # Straight out of the SPMD partitioner loops carry no annotation: a scan's condition is `counter < N`.
    condition = """%c2 (p: (s32[], f32[4,8])) -> pred[] {
  %i = s32[] get-tuple-element((s32[], f32[4,8]) %p), index=0
  %n = s32[] constant(2)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

"""
    partitioned = unannotated.replace("ENTRY", condition + "ENTRY").replace(
        "condition=%c, body=%outer", "condition=%c2, body=%outer"
    )
    assert by_kind(hlo_collectives(partitioned)) == EXPECTED
    with pytest.raises(ValueError, match="known trip count"):
        hlo_collectives(partitioned.replace("direction=LT", "direction=NE"))
