"""perf/static_perf.py and kernels/launches.py: the static model reads the launch a real call
makes (same kernel, grid, arguments, options), its SASS reading and budget arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from compress_ops.kernels import dequant as dq
from compress_ops.kernels import launches, tuning
from compress_ops.kernels.formats import dequant as dqf
from compress_ops.perf import static_perf as sp
from compress_ops.reference import dequant_linear_ref


def _call(m: int, n: int, k: int, bits: int, group: int | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gs = dqf.effective_group_size(k, group)
    kp = dqf.padded_k(k, gs)
    q = dqf.pack_bits(torch.randint(0, 2**bits, (n, kp), generator=g), bits)
    s = (torch.rand(n, kp // gs, generator=g) + 0.5).half() / 2**bits
    z = (torch.rand(n, kp // gs, generator=g) * (2**bits - 1)).half()
    x = (torch.randn(m, k, generator=g) + 0.1).half()
    return x, q, s, z, gs


def _summary(la: launches.Launch):
    args = tuple((tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a
                 for a in la.args)
    name = la.kernel if isinstance(la.kernel, str) else la.kernel.__name__
    return name, la.grid, args, la.kwargs


@pytest.mark.parametrize("m,bits,group", [(1, 4, 128), (3, 8, None), (16, 2, 64), (40, 4, 32)])
def test_recorded_launch_is_the_launch_a_real_call_runs(m, bits, group):
    """The model records without running (run=False); a real interpreter call records while
    running: same kernels, grids, arguments and options, and the real call is correct."""
    x, q, s, z, gs = _call(m, 48, 200, bits, group)
    with launches.capture(run=True) as real:
        y = dq.dequant_matmul(x, q, s, z, None, bits, gs)
    with launches.capture(run=False) as dry:
        dq.dequant_matmul(x, q, s, z, None, bits, gs)
    assert real and [_summary(a) for a in real] == [_summary(a) for a in dry]
    ref = dequant_linear_ref(x, q, s, z, None, bits, gs, dtype=torch.float64)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-3


def test_simulated_gpu_configures_like_that_gpu():
    """Inside simulate_gpu a CPU call picks what a call on that GPU picks (here: split-K for a
    skinny layer, sized by the SM count), and outside it does not."""
    x, q, s, z, gs = _call(16, 64, 4096, 4, 128)
    with launches.capture(run=False) as plain:
        dq.dequant_matmul(x, q, s, z, None, 4, gs)
    with tuning.simulate_gpu("NVIDIA H200", 132), launches.capture(run=False) as sim:
        dq.dequant_matmul(x, q, s, z, None, 4, gs)
    assert [la.kernel for la in plain if isinstance(la.kernel, str)] == []
    assert "torch.zeros" in [la.kernel for la in sim]
    assert tuning.gpu_target(torch.device("cpu")) is None


@pytest.mark.parametrize("m", [1, 16, 40])
def test_sparse24_records_its_launches(m):
    """The 2:4 launcher records its launches as the low-bit one does (the model's 2:4 rows):
    the dry run equals the real interpreter call, which is correct; a simulated H200 gets its
    own config (split-K for a skinny layer), not the interpreter's cached one."""
    from compress_ops.kernels import sparse24 as ks
    from compress_ops.kernels.formats import sparse24 as sf
    from compress_ops.reference import sparse24_linear_ref

    g = torch.Generator().manual_seed(m)
    w = sf.prune_2to4(torch.randn(48, 96, generator=g)).half()
    values, meta = sf.pack_sparse24(w)
    x = (torch.randn(m, 96, generator=g) + 0.1).half()
    with launches.capture(run=True) as real:
        y = ks.sparse24_matmul(x, values, meta)
    with launches.capture(run=False) as dry:
        ks.sparse24_matmul(x, values, meta)
    assert real and [_summary(a) for a in real] == [_summary(a) for a in dry]
    ref = sparse24_linear_ref(x, values, meta, None, dtype=torch.float64)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-3
    if m == 16:
        xs = torch.empty(16, 4096, dtype=torch.float16)
        vs, ms = torch.empty(64, 2048, dtype=torch.float16), torch.zeros(64, 128, dtype=torch.int32)
        with launches.capture(run=False) as plain:
            ks.sparse24_matmul(xs, vs, ms)
        with tuning.simulate_gpu("NVIDIA H200", 132), launches.capture(run=False) as sim:
            ks.sparse24_matmul(xs, vs, ms)
        assert "torch.zeros" not in [la.kernel for la in plain]
        assert "torch.zeros" in [la.kernel for la in sim]


def test_model_rows_cover_the_families():
    """The model's cases: the low-bit formats and 2:4 at the headline M values, low rank where
    its fused route runs (M <= fused_max_m)."""
    assert {c.family for c in sp.CASES} == {"dequant", "sparse24", "lowrank", "w8a8", "hashed"}
    low = [c for c in sp.CASES if c.family == "lowrank"]
    assert {c.rank for c in low} == {64, 128}
    assert low[0].weight_bytes(8192, 4096, torch.float16) == low[0].rank * (8192 + 4096) * 2
    assert [m for m in sp.HEADLINE["M"] if low[0].modelled(m)] == [1, 16, 64]
    sparse = [c for c in sp.CASES if c.family == "sparse24"][0]
    assert sparse.weight_bytes(64, 128, torch.float16) == 64 * 128 + 64 * 128 // 8
    assert sparse.tile_bytes(64, 128, torch.float16) == 64 * 128 * (1 + 1 / 8)


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   LOP3.LUT R8, R4, 0xf, RZ, 0xc0, !PT ;
        /*0040*/                   FADD R8, R8, -8388608 ;
        /*0050*/                   FFMA R9, R8, R10, R9 ;
        /*0060*/               @P0 BRA 0x20 ;
        /*0070*/                   STG.E.U16 desc[UR4][R2.64], R9 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
        /*00a0*/                   NOP;
"""


def test_sass_reading():
    ins = sp.parse_sass(SASS)
    assert [i.base for i in ins][-1] == "EXIT"  # trailing self-branch and NOPs dropped
    assert sp.loops(ins) == [(2, 6)]
    body = ins[2:7]
    mix = sp.mix(body)
    assert mix["LDG"] == 1 and mix["LDG.16B"] == 1 and mix["LOP3"] == 1 and mix["FFMA"] == 1
    assert mix["total"] == 5


def test_occupancy_limits():
    assert sp.ctas_per_sm(32, 0, 4) == 16  # warps: 64 / 4
    assert sp.ctas_per_sm(255, 0, 8) == 1  # registers
    assert sp.ctas_per_sm(64, 100 * 1024, 4) == 2  # shared memory


def test_issue_time_counts_the_schedulers_resident_warps_occupy():
    cycles = lambda *a: sp.issue_seconds(*a) * sp.MODEL["clock_hz"]  # noqa: E731
    # the same 4000 warp instructions per CTA, one CTA per SM: 4 warps use the 4 schedulers,
    # 2 warps of 2000 each use 2 of them and take twice as long, 1 warp takes 4 times
    assert cycles(1000, 4, 132, 1) == pytest.approx(1000)
    assert cycles(2000, 2, 132, 1) == pytest.approx(2000)
    assert cycles(4000, 1, 132, 1) == pytest.approx(4000)
    # two 2-warp CTAs resident per SM fill the 4 schedulers (264 CTAs: two per SM)
    assert cycles(2000, 2, 264, 2) == pytest.approx(2000)
    # CTAs past one per SM that cannot be resident together run in turns
    assert cycles(1000, 8, 264, 1) == pytest.approx(4000)


def test_budgets_limits_and_targets():
    rows = [{"family": "dequant", "config": "int4 g128 asym", "M": 1, "kernel": "k",
             "triton": "x", "loop_instr_per_weight": 5.0, "launches": 1}]
    budgets = {"rules": [{"name": "r", "family": "dequant", "config": "int4 g128 asym",
                          "M": [1, 4], "limits": {"max_loop_instr_per_weight": 6.0,
                                                  "max_launches": 1},
                          "targets": {"max_loop_instr_per_weight": 4.0}}]}
    assert sp.check_budgets(rows, budgets) == []
    assert len(sp.check_budgets(rows, budgets, "targets")) == 1
    rows[0]["launches"] = 3
    assert "max_launches" in sp.check_budgets(rows, budgets)[0]


def test_shipped_budget_file_is_well_formed():
    budgets = sp.load_budgets()
    for rule in budgets["rules"]:
        assert rule["family"] in ("dequant", "sparse24", "lowrank", "dwsep_conv", "w8a8",
                                  "hashed")
        for key in ("limits", "targets"):
            for name in rule.get(key, {}):
                assert name[:4] in ("max_", "min_")


@pytest.mark.slow
def test_specialization_is_tritons_own():
    """Without the interpreter, a recorded GEMV call (fp32 x at M = 1) specializes like a real
    launch: the pointers and the K-sized ints divisible by 16 (the attrs the old hand list
    missed)."""
    code = (
        "import json, torch\n"
        "from compress_ops.kernels import dequant as dq, launches, tuning\n"
        "from compress_ops.kernels.formats import dequant as f\n"
        "q, s, z = f.empty_affine(256, 512, 4, 128, False, dtype=torch.float32)\n"
        "x = torch.empty(1, 512, dtype=torch.float32)\n"
        "with tuning.simulate_gpu(), launches.capture(run=False) as got:\n"
        "    dq.dequant_matmul(x, q, s, z, None, 4, 128)\n"
        "la = got[0]\n"
        "sig, consts, attrs, opts = launches.specialization(la.kernel, la.args, la.kwargs)\n"
        "names = [p.name for p in la.kernel.params]\n"
        "div = sorted(names[k[0]] for k, v in attrs.items()"
        " if any(a[0] == 'tt.divisibility' for a in v))\n"
        "print(json.dumps({'kernel': la.kernel.__name__, 'div': div}))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["kernel"] == "_fields_gemv_kernel"
    assert {"x_ptr", "q_ptr", "s_ptr", "y_ptr", "K", "KP", "stride_qn"} <= set(got["div"])


def test_two_gemms_baseline_is_two_rooflines_and_two_launches():
    """Low rank's baseline: x V^T then t U^T, each on dense's roofline with its own launch."""
    e, m, n, k, r = 2, 16, 8192, 4096, 128
    bw, lu = sp.MODEL["hbm_bytes_per_s"], sp.MODEL["launch_us"]
    want = ((r * k + m * k + m * r) * e / bw + (n * r + m * r + m * n) * e / bw) * 1e6 + 2 * lu
    assert sp.two_gemms_us(m, n, k, r, torch.float16) == pytest.approx(want)


def test_phase_split_finds_the_end_of_phase_one():
    sass = """
        /*0000*/                   ATOMG.E.ADD.STRONG.GPU PT, R3, desc[UR4][R2.64], R5 ;
        /*0010*/                   REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R8 ;
        /*0020*/                   REDG.E.ADD.STRONG.GPU desc[UR4][R2.64], R5 ;
        /*0030*/                   EXIT ;
        /*0040*/                   LDG.E.STRONG.GPU R4, desc[UR4][R2.64] ;
        /*0050*/                   EXIT ;
    """
    instrs = sp.parse_sass(sass)
    assert sp._phase_split(instrs) == 4
    with pytest.raises(ValueError, match="arrival"):
        sp._phase_split(instrs[3:])


NESTED = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/                   FFMA R3, R4, R5, R3 ;
        /*0030*/               @P1 BRA 0x20 ;
        /*0040*/                   IADD3 R6, R6, 0x1, RZ ;
        /*0050*/               @P0 BRA 0x10 ;
        /*0060*/                   EXIT ;
"""


def test_nested_loops_are_counted_with_their_trips():
    """An outer loop of 3 instructions of its own (two adds and its branch) run 5 times around
    an inner one of 2 run 3 times per outer trip, plus 2 straight-line instructions:
    2 + 5 (3 + 3 * 2)."""
    instrs = sp.parse_sass(NESTED)
    assert sp.all_loops(instrs) == [(1, 5), (2, 3)]
    assert sp.loops(instrs) == [(1, 5)]
    assert sp.nested_count(instrs, [5, 3]) == 2 + 5 * (3 + 3 * 2)
    assert sp.nested_count(instrs, [1]) == len(instrs)


def test_cudnn_pair_is_two_rooflines_and_two_launches():
    pair = sp.DWSepPair(56, 144, 24, 1)
    e, bw, lu = 2, sp.MODEL["hbm_bytes_per_s"], sp.MODEL["launch_us"]
    p = 32 * 56 * 56
    dw = (32 * 56 * 56 * 144 + p * 144) * e / bw
    pw = max((p * 144 + 144 * 24 + p * 24) * e / bw,
             2 * p * 144 * 24 / sp.MODEL["hgmma_flops_per_s"])
    assert sp.cudnn_pair_us(pair, torch.float16) == pytest.approx((dw + pw) * 1e6 + 2 * lu)
    assert sp.DWSepPair(56, 144, 32, 2).out == 28 and pair.out == 56
    assert len(sp.DWSEP_PAIRS) == 9


def test_dwsep_sum_row_sums_the_pairs_and_is_not_a_shape():
    rows = [{"predicted_us": 2.0, "predicted_baseline_us": 3.0, "M": 10, "kernel": "k",
             "dtype": "fp16", "triton": "x", "instr_per_weight": 4.0,
             "loop_instr_per_weight": 5.0, "weight_passes": 1, "bytes_in_flight_per_sm": 7,
             "ctas_per_sm": 2, "launches": 1, "dw_recompute": r, "registers": 90,
             "grid": g} for r, g in ((1, 200), (3, 50))]
    s = sp.dwsep_sum_row(rows)
    assert s["predicted_us"] == 4.0 and s["predicted_baseline_us"] == 6.0
    assert s["predicted_speedup_vs_baseline"] == 1.5 and s["launches"] == 2
    assert s["M"] == 0 and s["dw_recompute"] == 3 and s["grid"] == 50
    assert s["dtype"] == "fp16" and s["config"] == "mbv2 pairs (sum)"


def test_semi_structured_route_prediction():
    """torch's 2:4 route (unpack, convert, sparse GEMM) on rooflines: its conversions are a fixed
    cost per call, so it loses to dense at small M and wins at large M by less than the sparse
    tensor cores' factor; a slower sparse GEMM moves the crossover with our kernel up."""
    half = torch.float16
    assert sp.semi_structured_route_us(64) > sp.dense_us(64, 8192, 8192, half)
    big = sp.dense_us(8192, 8192, 8192, half) / sp.semi_structured_route_us(8192)
    assert 1.5 < big < 2.0
    assert sp.semi_structured_route_us(2048, sparse_speedup=1.5) > \
        sp.semi_structured_route_us(2048, sparse_speedup=2.0)
    fast, slow = sp.semi_structured_crossover(0.97, 2.0), sp.semi_structured_crossover(0.97, 1.5)
    assert fast is not None and slow is not None and 256 < fast < slow < 8192
    # a kernel already at dense's speed is beaten only where the sparse GEMM saves more than
    # the conversions cost
    assert sp.semi_structured_crossover(1.0, 2.0) >= fast


OPERAND = """
        /*0000*/                   LDS.128 R8, [R2+UR4+0x100] ;
        /*0010*/                   LDS R12, [R2+0x200] ;
        /*0020*/                   IADD3 R20, R20, 0x1, RZ ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR6][R4.64] ;
        /*0040*/                   SHF.R.S32.HI R13, RZ, R14, R12 ;
        /*0050*/                   IMAD R13, R13, R15, 0x9dc5 ;
        /*0060*/                   PRMT R16, R17, R13, 0x76545476 ;
        /*0070*/                   PRMT R24, RZ, R16, R8 ;
        /*0080*/                   PRMT R25, RZ, R16, R9 ;
        /*0090*/              @P0  PRMT R26, RZ, R16, R10 ;
        /*00a0*/                   PRMT R27, RZ, R30, R11 ;
        /*00b0*/                   WARPGROUP.ARRIVE ;
        /*00c0*/                   HGMMA.64x64x16.F32 R40, R24, gdesc[UR8], R40 ;
        /*00d0*/                   ISETP.GE.AND P0, PT, R20, R21, PT ;
        /*00e0*/                   IMAD.MOV.U32 R30, RZ, RZ, R31 ;
        /*00f0*/               @P1 BRA 0x0 ;
        /*0100*/                   EXIT ;
"""


def test_operand_slice_is_the_register_path_to_the_mma_weight_operand():
    """The slice of HGMMA's register A operand (4 registers): the permutes, the selector
    arithmetic, both loads (LDS.128 defines R8..R11), the guarded permute's compare and the
    counter it reads, and the definition that reaches around the back edge (R30, set after the
    MMA); not the async copy, the MMA itself or the branch."""
    ins = sp.parse_sass(OPERAND)
    assert ins[9].guard == "@P0" and ins[0].guard == ""
    lo, hi = sp.loops(ins)[0]
    body = ins[lo:hi + 1]
    got = sp.operand_slice(body)
    assert got == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 13, 14]
    # a loop with no register operand and no stores has no slice
    assert sp.operand_slice(body[:4]) is None
    # a staged tile: the store's data (4 registers of STS.128) and address are the roots,
    # and the store itself is counted
    staged = sp.parse_sass("""
        /*0000*/                   LDS.128 R8, [R2] ;
        /*0010*/                   PRMT R24, RZ, R5, R8 ;
        /*0020*/                   PRMT R27, RZ, R5, R11 ;
        /*0030*/                   IADD3 R6, R6, 0x10, RZ ;
        /*0040*/                   STS.128 [R7+0x100], R24 ;
        /*0050*/                   HGMMA.64x64x16.F32 R40, gdesc[UR4], R40 ;
        /*0060*/               @P1 BRA 0x0 ;
""")
    assert sp.operand_slice(staged) == [0, 1, 2, 4]
