"""benchmarks/profile_decode.py: naming traced ops from an optimized-HLO dump (no timing, no
compile: a hand-written HLO text with XLA's stack-frame tables)."""

from benchmarks import profile_decode

HLO = """HloModule jit__decode, is_scheduled=true

FileNames
1 "/repo/reczero_jax/models/decoder.py"
2 "/venv/site-packages/jax/_src/lax/control_flow/loops.py"

FunctionNames
1 "Decoder._project"
2 "Decoder.forward"
3 "scan"

FileLocations
1 {file_name_id=1 function_name_id=1 line=290 end_line=290 column=12 end_column=59}
2 {file_name_id=1 function_name_id=2 line=212 end_line=212 column=8 end_column=70}
3 {file_name_id=2 function_name_id=3 line=100 end_line=100 column=1 end_column=9}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=2}

%fused_computation (p0: f32[8,576], p1: f32[576,192]) -> f32[8,192] {
  %p0 = f32[8,576]{1,0} parameter(0)
  %p1 = f32[576,192]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,192]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[30,576,192]) -> f32[8,192] {
  %ynn_fusion.3 = f32[8,192] fusion(%x), calls=%fused_computation, metadata={op_name="a/dot_general" \
stack_frame_id=1}
  %ynn_fusion.4 = f32[8,192] fusion(%x), calls=%fused_computation
  %dynamic-slice_bitcast_fusion = f32[576,192] fusion(%a), calls=%fc.2, metadata={op_name="a/dynamic_slice" \
stack_frame_id=3}
  %copy_bitcast_fusion.1 = f32[3,64,512] fusion(%a), calls=%fc.3, metadata={op_name="a" stack_frame_id=2}
  %while.7 = (s32[]) while(%t), condition=%cond, body=%body
  ROOT %add_fusion = f32[8,192]{1,0} fusion(%ynn_fusion.3), kind=kLoop, calls=%fc.4
}
"""


def test_ops_are_charged_to_the_innermost_project_function_and_their_kind():
    ops = profile_decode.parse_hlo(HLO)
    assert ops["ynn_fusion.3"] == ("Decoder._project", "matmul")
    # No metadata, but its fused computation holds a dot.
    assert ops["ynn_fusion.4"] == ("(no project frame)", "matmul")
    # jax's scan frame is not the project's: its parent (Decoder.forward) is charged.
    assert ops["dynamic-slice_bitcast_fusion"] == ("Decoder.forward", "slice copy")
    assert ops["copy_bitcast_fusion.1"] == ("Decoder.forward", "copy/transpose")
    assert ops["while.7"][1] is None  # a container: its body ops are counted instead
    assert ops["add_fusion"][1] == "elementwise/reduce"


def test_breakdown_sums_per_unit_and_skips_containers():
    programs = {"8": profile_decode.parse_hlo(HLO)}
    events = [("8", "ynn_fusion.3", 3e6), ("8", "ynn_fusion.3", 1e6), ("8", "while.7", 50e6),
              ("8", "dynamic-slice_bitcast_fusion", 2e6), ("9", "other", 2e6)]
    rows, total = profile_decode.breakdown(events, programs, per=2)
    assert rows[0] == ("Decoder._project", "matmul", 2.0, 1.0)  # 4 ms over 2 steps, 1 op each
    assert ("Decoder.forward", "slice copy", 1.0, 0.5) in rows
    assert ("(not in the dump)", "elementwise/reduce", 1.0, 0.5) in rows
    assert total == 4.0
    table = profile_decode.breakdown_table(rows, total, wall_ms=2.0)
    assert "| Decoder._project | matmul | 2.00 | 50.0% | 1 |" in table
    assert "busy 2.00 threads" in table
