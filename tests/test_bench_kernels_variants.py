"""bench/kernels.py's A/B of kernel source versions (--sources) and its static analysis, without a GPU:
argument parsing (kernels.py), sources taken from git revisions and the launch-contract checks
(kernel_sources.py), SASS counting (kernel_static.py), and the timing loop's bookkeeping
(kernel_ab.py, kernel_timing.py) with the CUDA calls replaced by stand-ins."""
from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from plugins import build, config

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
OLD = "59deae0^"  # the kernels before read-only loads, gamma/beta prefetch and two-pass LayerNorm statistics

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not on PATH")


def _has_revision(rev: str) -> bool:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                          capture_output=True).returncode == 0


needs_history = pytest.mark.skipif(not _has_revision(OLD), reason=f"{OLD} is not in this clone (shallow?)")


@pytest.fixture(scope="module")
def kernels(bench_script):
    """bench/kernels.py, with its sibling modules (kernel_sources, kernel_ab, kernel_static, ...)."""
    return bench_script("kernels")


def _sibling(name: str, module: str):
    """A fixture for one of kernels.py's sibling modules: the very module object kernels.py imported,
    so that what a test patches there is what kernels.py runs."""
    return pytest.fixture(scope="module", name=name)(lambda kernels: importlib.import_module(module))


sources = _sibling("sources", "kernel_sources")
static = _sibling("static", "kernel_static")
ab = _sibling("ab", "kernel_ab")
timing = _sibling("timing", "kernel_timing")


def test_the_parts_import_nothing_from_the_command_line():
    """kernels.py imports its sibling modules, never the reverse; static analysis needs no torch."""
    done = subprocess.run([sys.executable, "-c", "import sys, kernel_static; torch = 'torch' in sys.modules; "
                           "import kernel_ab, kernel_grid, kernel_sources, kernel_timing; "
                           "print(torch, 'kernels' in sys.modules)"],
                          cwd=BENCH, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


def code_only(ptx: str) -> str:
    """PTX without line information and debug strings (they follow the source files' line numbers)."""
    ptx = ptx.split(".section\t.debug_str")[0]
    return "\n".join(line for line in ptx.splitlines() if not line.strip().startswith((".loc", ".file", "//")))


def test_default_run_has_no_variants(kernels):
    args = kernels.parse_args([])
    assert args.variants == [] and args.static is None and args.out is None


def test_sources_parse_commas_spaces_and_switches(kernels, tmp_path):
    args = kernels.parse_args(["--quick", "--sources", f"HEAD,{OLD}", "worktree+NORMFUSE_AB_NO_PREFETCH+NORMFUSE_AB_MIN_THREADS_PER_SM=1024",
                               "--variant-dir", str(tmp_path)])
    assert [v.label for v in args.variants] == ["HEAD", OLD, "worktree+NORMFUSE_AB_NO_PREFETCH+NORMFUSE_AB_MIN_THREADS_PER_SM=1024",
                                                str(tmp_path)]
    assert args.variants[2].base == "worktree"
    assert args.variants[2].defines == ("NORMFUSE_AB_NO_PREFETCH", "NORMFUSE_AB_MIN_THREADS_PER_SM=1024")
    assert args.variants[3].base == str(tmp_path) and args.variants[3].defines == ()


@pytest.mark.parametrize("argv,message", [
    (["--sources", "HEAD,HEAD"], "given twice"),
    (["--sources", "HEAD+bad switch"], "bad switch"),
    (["--sources", "+NORMFUSE_AB_NO_PREFETCH"], "no revision"),
    (["--static", "sm_70"], "sm_80 or newer"),
])
def test_bad_arguments_are_one_line_errors(kernels, capsys, argv, message):
    with pytest.raises(SystemExit):
        kernels.parse_args(argv)
    assert message in capsys.readouterr().err


def test_static_defaults_to_the_work_tree(kernels):
    args = kernels.parse_args(["--static", "sm_90,sm_80"])
    assert args.arches == ["sm_90", "sm_80"] and [v.base for v in args.variants] == ["worktree"]


def test_timing_without_cuda_is_one_line_that_points_to_static(kernels, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the script would time kernels")
    with pytest.raises(SystemExit) as exc:
        kernels.main(["--quick", "--out", str(tmp_path / "r")])
    assert str(exc.value).startswith("error: bench/kernels.py times the kernels on an NVIDIA GPU: ")
    assert "--static ARCH" in str(exc.value) and not (tmp_path / "r").exists()


def test_unknown_revision_and_revision_without_kernels_are_refused(sources, tmp_path):
    with pytest.raises(sources.VariantError, match="neither a git revision"):
        sources.materialise(sources.parse_sources(["no-such-revision-here"])[0], tmp_path)
    root = subprocess.run(["git", "-C", str(ROOT), "rev-list", "--max-parents=0", "HEAD"], capture_output=True,
                          text=True).stdout.split()
    if not root or _has_revision(f"{root[0]}:plugins/norm_common.cuh"):
        pytest.skip("no revision without the kernels in this clone")
    with pytest.raises(sources.VariantError, match="has no plugins/"):
        sources.materialise(sources.parse_sources([root[0]])[0], tmp_path)


def test_a_switch_the_sources_never_mention_is_refused(sources, tmp_path):
    with pytest.raises(sources.VariantError, match="never mention NORMFUSE_AB_NO_SUCH_SWITCH"):
        sources.materialise(sources.parse_sources(["worktree+NORMFUSE_AB_NO_SUCH_SWITCH"])[0], tmp_path)


@needs_history
@needs_nvcc
@pytest.mark.parametrize("op", ["RMSNorm", "LayerNorm", "AddRMSNorm"])
def test_an_older_revision_compiles_to_a_distinct_module(sources, tmp_path, op):
    old = sources.materialise(sources.parse_sources([OLD])[0], tmp_path)
    assert old.commit and old.source_dir and (old.source_dir / build.HEADER).is_file()
    assert (old.source_dir / build.HEADER).read_bytes() != (build.SOURCE_DIR / build.HEADER).read_bytes()
    cfg = config.launch_config(op, "bfloat16", 65536, 4096)
    for arch in build.ARCHES:
        ptx_old = sources.variant_ptx(old, op, "bfloat16", "bfloat16", cfg, arch)
        ptx_new = build.ptx_for_launch(op, "bfloat16", "bfloat16", cfg, arch)
        assert f".entry {cfg.kernel}(" in ptx_old
        assert code_only(ptx_old) != code_only(ptx_new)
        assert "ld.global.nc" in ptx_new and "ld.global.nc" not in ptx_old  # the read-only loads came later
        assert sources.entry_contract(ptx_old, cfg.kernel) == sources.entry_contract(ptx_new, cfg.kernel)
        build.ptxas_check(ptx_old, arch)


@needs_history
def test_saved_sources_stand_in_for_the_revision(kernels, sources, tmp_path, capsys):
    kernels.main(["--sources", OLD, "--save-sources", str(tmp_path / "saved")])
    (saved,) = (tmp_path / "saved").iterdir()
    assert "--variant-dir" in capsys.readouterr().out
    from_dir = sources.materialise(sources.parse_sources([str(saved)])[0], tmp_path / "work")
    from_git = sources.materialise(sources.parse_sources([OLD])[0], tmp_path / "work")
    assert from_dir.commit == from_git.commit and from_dir.sources_sha256 == from_git.sources_sha256


@needs_nvcc
def test_a_changed_kernel_signature_is_refused(sources, tmp_path):
    for f in sources.SOURCE_FILES:
        shutil.copy(build.SOURCE_DIR / f, tmp_path / f)
    rms = tmp_path / "rms_norm.cu"
    rms.write_text(rms.read_text().replace("int rows, int hidden, int eps_bits,", "int rows, int hidden, int eps_bits, int extra,"))
    variant = sources.materialise(sources.parse_sources([str(tmp_path)])[0], tmp_path)
    cfg = config.launch_config("RMSNorm", "bfloat16", 8, 4096)
    with pytest.raises(sources.VariantError, match="different kernel signature"):
        sources.variant_ptx(variant, "RMSNorm", "bfloat16", "bfloat16", cfg, "sm_80")


@needs_nvcc
def test_a_switch_changes_the_kernel_and_the_default_stays(sources, tmp_path):
    plain, switched = (sources.materialise(v, tmp_path) for v in
                       sources.parse_sources(["worktree", "worktree+NORMFUSE_AB_NO_TRAILING_SYNC"]))
    cfg = config.launch_config("RMSNorm", "bfloat16", 8, 4096)
    a = sources.variant_ptx(plain, "RMSNorm", "bfloat16", "bfloat16", cfg, "sm_90")
    b = sources.variant_ptx(switched, "RMSNorm", "bfloat16", "bfloat16", cfg, "sm_90")
    assert a == build.ptx_for_launch("RMSNorm", "bfloat16", "bfloat16", cfg, "sm_90")
    # one reduction in each of the three paths (streaming, scalar, vector): two barriers each, then one
    assert a.count("bar.sync") == 6 and b.count("bar.sync") == 3


def test_occupancy_from_registers(static):
    assert static.occupancy(64, 256, "sm_90") == (4, 32)
    assert static.occupancy(59, 256, "sm_90") == (4, 32)  # registers are granted 8 a thread at a time
    assert static.occupancy(80, 256, "sm_90") == (3, 24)
    assert static.occupancy(128, 256, "sm_90") == (2, 16)
    assert static.occupancy(48, 256, "sm_90") == (5, 40)
    assert static.occupancy(32, 1024, "sm_80") == (2, 64)  # threads, not registers, limit here


SASS = """
        /*0100*/              @P0 LDG.E.128.CONSTANT R12, desc[UR6][R12.64] ;   /* 0x0 */
        /*0110*/              @P1 LDG.E.128.CONSTANT R8, desc[UR6][R8.64] ;     /* 0x0 */
        /*0120*/                  SHFL.BFLY PT, R9, R10, 0x10, 0x1f ;           /* 0x0 */
        /*0130*/              @P0 CCTL.E.PF2 [R32] ;                            /* 0x0 */
        /*0140*/                  BAR.SYNC.DEFER_BLOCKING 0x0 ;                 /* 0x0 */
        /*0150*/                  BAR.SYNC.DEFER_BLOCKING 0x0 ;                 /* 0x0 */
        /*0160*/                  LDG.E.128.CONSTANT R8, desc[UR6][R8.64] ;     /* 0x0 */
        /*0170*/                  STG.E.128 desc[UR6][R12.64], R8 ;             /* 0x0 */
        /*0180*/              @!P1 EXIT ;                                       /* 0x0 */
        /*0190*/                  LDG.E.128.CONSTANT R8, desc[UR6][R8.64] ;     /* 0x0 */
        /*01a0*/                  LDG.E.128.CONSTANT R4, desc[UR6][R4.64] ;     /* 0x0 */
        /*01b0*/                  STG.E.128 desc[UR6][R2.64], R8 ;              /* 0x0 */
        /*01c0*/                  EXIT ;                                        /* 0x0 */
        /*01d0*/                  BRA 0x1d0;                                    /* 0x0 */
"""


def test_sass_summary_counts_the_vector_path(static):
    instructions = [(int(m.group(1), 16), m.group(2)) for m in static._SASS_LINE.finditer(SASS)]
    s = static.sass_summary(instructions)
    vp = s["vector_path"]
    assert vp["LDG.E.128.CONSTANT"] == 5 and vp["STG.E.128"] == 2
    assert vp["BAR.SYNC.DEFER_BLOCKING"] == 2 and vp["CCTL.E.PF2"] == 1 and vp["SHFL.BFLY"] == 1
    assert s["param_load_round_trips_after_last_barrier"] == 2  # loads, store, loads, store
    assert s["loops"] == 1 and s["vector_path_loops"] == 0  # the trailing BRA to itself is past the path


def test_a_failing_disassembler_is_a_reason_not_a_crash(static, tmp_path, monkeypatch):
    """cuobjdump from pip runs nvdisasm, which is another package: without it cuobjdump exits 1.
    The SASS columns then read n/a with cuobjdump's own last line as the reason."""
    fake = tmp_path / "bin"
    fake.mkdir()
    tool = fake / "cuobjdump"
    tool.write_text("#!/bin/sh\necho 'cuobjdump fatal   : Could not find executable file nvdisasm' >&2\nexit 1\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    with pytest.raises(static.build.ToolchainError, match="cuobjdump failed: cuobjdump fatal   : Could not find executable file nvdisasm"):
        static.sass_instructions(tmp_path / "kernel.cubin")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(static.build.ToolchainError, match="nvidia-cuda-nvdisasm"):
        static.sass_instructions(tmp_path / "kernel.cubin")


@needs_nvcc
def test_static_analysis_of_the_work_tree(sources, static, tmp_path):
    variants = [sources.materialise(v, tmp_path) for v in sources.parse_sources(["worktree"])]
    rows = static.static_analysis(variants, ["sm_90"], ["RMSNorm"], "bfloat16", (4096,))
    (row,) = rows
    assert row["kernel"] == config.launch_config("RMSNorm", "bfloat16", 1, 4096).kernel
    assert 0 < row["registers"] <= 255 and row["blocks_per_sm"] >= 1
    assert row["input_bytes_per_sm"] == row["blocks_per_sm"] * 4096 * 2
    if shutil.which("cuobjdump") or shutil.which("nvdisasm"):
        assert row["sass"]["vector_path"]["LDG.E.128.CONSTANT"] >= 2
    else:
        assert "error" in row["sass"]
    table = static.report_static(rows)
    assert "static analysis" in table and row["kernel"] in table
    if "error" in row["sass"]:  # missing counts read as n/a with the reason, never as zeros
        assert "| n/a |" in table and "SASS counts n/a:" in table and "| 0 (-) |" not in table


@needs_nvcc
def test_static_analysis_of_the_split_layouts_only_where_they_are_compiled(sources, static, tmp_path):
    variants = [sources.materialise(v, tmp_path) for v in sources.parse_sources(["worktree"])]
    rows = static.static_analysis(variants, ["sm_80", "sm_90"], ["RMSNorm"], "bfloat16", (4096,), split=True)
    split = [config.launch_config("RMSNorm", "bfloat16", 1, 4096, layout=lo).kernel
             for lo in config.split_layouts("bfloat16", 4096)]
    assert split and all(k.endswith(("_s2", "_s4", "_s8")) for k in split)
    assert sorted((r["arch"], r["kernel"]) for r in rows) == sorted(
        [(a, config.launch_config("RMSNorm", "bfloat16", 1, 4096).kernel) for a in ("sm_80", "sm_90")]
        + [("sm_90", k) for k in split])  # sm_80 has no clusters: no split-row kernels there


class FakeEvent:
    clock = 0.0

    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        FakeEvent.clock += 1.0
        self.t = FakeEvent.clock

    def elapsed_time(self, end):
        return (end.t - self.t) / 1e3 * 2  # ms


class FakeStream:
    cuda_stream = 0


def test_interleaved_timing_rotates_the_order(timing, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    timer = object.__new__(timing.Timer)
    timer.flush_buf, timer.flush_mode = torch.zeros(8, dtype=torch.int8), "dirty"
    calls = []
    fns = [lambda k=k: calls.append(k) for k in range(3)]
    times = timer.times_us_interleaved(fns, budget_s=0.0, min_reps=4)
    assert [len(t) for t in times] == [4, 4, 4] and all(v == 2.0 for t in times for v in t)
    timed = calls[-12:]  # after the warm-up and the estimate
    assert timed == [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]


def stand_in_ab(ab, monkeypatch, arch: str = "sm_90") -> list[tuple[str, int, int]]:
    """bench/kernel_ab on the CPU: launches record (kernel, inputs, outputs) in the list returned
    and do nothing, and the timer hands out fixed times (the second launch of a round half the
    first's), so only the loop, the records and the report are exercised."""
    import torch

    class Timer:
        def __init__(self, flush_mode):
            self.flush_mode = flush_mode

        def times_us_interleaved(self, fns, budget_s, flush=True):
            for fn in fns:
                fn()
            return [[10.0, 12.0, 11.0], [5.0, 6.0, 5.5]][:len(fns)]

    launched: list[tuple[str, int, int]] = []

    class Launch(ab.VariantLaunch):
        def __call__(self, inputs, outputs, epsilon, stream):
            launched.append((self.cfg.kernel, len(inputs), len(outputs)))

    monkeypatch.setattr(ab, "Timer", Timer)
    monkeypatch.setattr(ab, "VariantLaunch", Launch)
    monkeypatch.setattr(ab, "device_info", lambda: {"name": "stand-in"})
    monkeypatch.setattr(ab, "reference_timings", lambda timer: {
        "copy": {"tbps": 3.0}, "empty_launch": {"median_us": 4.0}, "empty_launch_l2_warm": {"median_us": 3.8}})
    monkeypatch.setattr(ab, "SameSizeCopy", lambda timer, budget: (lambda nbytes: 2.5))
    monkeypatch.setattr(ab, "tensors", lambda op, dtype, tokens, hidden: (
        torch.zeros(tokens, hidden, dtype=torch.bfloat16),
        torch.zeros(tokens, hidden, dtype=torch.bfloat16) if ab.OPS[op].has_residual else None,
        torch.ones(hidden, dtype=torch.bfloat16),
        torch.zeros(hidden, dtype=torch.bfloat16) if ab.OPS[op].centered else None))
    monkeypatch.setattr(ab.build, "target_arch", lambda: arch)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: FakeStream())
    monkeypatch.setattr(ab.launcher, "_function", lambda ptx, kernel: None)
    return launched


@needs_nvcc
def test_run_variants_bookkeeping_with_stand_ins(kernels, sources, ab, monkeypatch, tmp_path):
    """run_variants and report_variants end to end on the CPU (see stand_in_ab)."""
    variants = [sources.materialise(v, tmp_path) for v in sources.parse_sources(["worktree", "worktree+NORMFUSE_AB_NO_PREFETCH"])]
    launched = stand_in_ab(ab, monkeypatch)
    args = kernels.parse_args(["--sources", "worktree,worktree+NORMFUSE_AB_NO_PREFETCH", "--tokens", "1", "4096",
                               "--hidden", "4096", "--dtypes", "bfloat16", "--ops", "RMSNorm", "AddLayerNorm"])
    args.partial = tmp_path / "partial.json"
    data = ab.run_variants(args, variants)
    # 2 ops x 2 token counts, the decode shape twice (L2 flushed and warm), 2 variants each
    assert len(data["results"]) == 2 * (2 + 1) * 2
    first, second = data["results"][:2]
    assert first["variant"] == "worktree" and second["variant"] == "worktree+NORMFUSE_AB_NO_PREFETCH"
    assert data["flush"] == "dirty" and "(dirty;" in data["timing"]
    assert first["ratio_to_first"] == 1.0 and second["ratio_to_first"] == pytest.approx(0.5)
    assert first["median_us"] == 11.0 and first["times_us"] == [10.0, 12.0, 11.0]
    assert {r["impl"] for r in data["results"]} == {"normfuse", "normfuse_l2_warm"}
    assert ("normfuse_add_layer_norm_t256_r1_c2", 4, 2) in launched
    table = ab.report_variants(data)
    assert "worktree+NORMFUSE_AB_NO_PREFETCH ratio" in table and "| 0.500 |" in table
    assert len(table.splitlines()) == 3 + 2 * 3
    assert re.search(r"\| RMSNorm \| bfloat16 \| 1x4096 \| \S+ \| L2 warm \|", table)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_run_variants_times_the_split_layouts_side_by_side(kernels, sources, ab, monkeypatch, tmp_path, arch):
    """--sources with --split: at decode each version's split-row kernels too (the exchange's A/B:
    cluster barrier against mbarrier), each recorded with its blocks per row; none on a GPU
    without clusters, and none past SPLIT_MAX_TOKENS."""
    labels = ["worktree", "worktree+NORMFUSE_AB_SPLIT_MBARRIER"]
    variants = [sources.materialise(v, tmp_path) for v in sources.parse_sources([",".join(labels)])]
    launched = stand_in_ab(ab, monkeypatch, arch)
    args = kernels.parse_args(["--sources", ",".join(labels), "--split", "--tokens", "1", "4096", "--hidden", "4096",
                               "--dtypes", "bfloat16", "--ops", "AddLayerNorm"])
    args.partial = tmp_path / "partial.json"
    data = ab.run_variants(args, variants)
    split = config.split_layouts("bfloat16", 4096) if arch == "sm_90" else []
    decode = [r for r in data["results"] if r["tokens"] == 1]
    # the table's kernel and each split layout, L2 flushed and warm, both versions
    assert len(decode) == (1 + len(split)) * 2 * 2
    assert len([r for r in data["results"] if r["tokens"] == 4096]) == 2  # the table's kernel only
    kernels_timed = {r["kernel"] for r in decode}
    assert kernels_timed == {config.launch_config("AddLayerNorm", "bfloat16", 1, 4096, layout=lo).kernel
                             for lo in [None, *split]}
    for r in decode:
        if r["kernel"].endswith(tuple(f"_s{lo[3]}" for lo in split)):
            assert len(r["layout"]) == 4 and r["layout"][3] > 1
    assert {r["variant"] for r in decode} == set(labels)
    if split:
        assert any(k.endswith("_s2") for k, _, _ in launched)
        table = ab.report_variants(data)
        assert "worktree+NORMFUSE_AB_SPLIT_MBARRIER ratio" in table and "_s2 | L2 warm |" in table


# The revision whose default kernels are the ones the H100 GPU tests last passed (their PTX, line
# information aside). Move it only after the GPU tests pass on a change to the default kernels.
PROVEN = "de42ef4"


@pytest.mark.skipif(not _has_revision(PROVEN), reason=f"{PROVEN} is not in this clone (shallow?)")
@needs_nvcc
@pytest.mark.parametrize("op", ["RMSNorm", "AddLayerNorm"])
def test_the_default_kernels_are_the_ones_the_gpu_tests_proved(sources, tmp_path, op):
    """Row-loop variants and A/B switches are additions: every one-row entry point still compiles
    to the PTX of the proven revision, so that proof still covers what the launch table picks."""
    proven = sources.materialise(sources.parse_sources([PROVEN])[0], tmp_path)
    entries = lambda ptx: {m.group(1): code_only(m.group(0)) for m in re.finditer(r"\.entry (\w+)\(.*?\n\}\n", ptx, re.S)}
    now = entries(build.get_ptx(op, "bfloat16", "float32", arch="sm_90"))  # every variant, one module each side
    then = entries(build.get_ptx(op, "bfloat16", "float32", arch="sm_90", source_dir=proven.source_dir, defines=()))
    one_row = [config.kernel_name(op, t, r, c) for t, r, c in config.variants("bfloat16") if r == config.groups_per_block(t)]
    assert len(one_row) == 18
    for kernel in one_row:
        assert now[kernel] == then[kernel], kernel


def test_tactic_report_names_the_layout_tensorrt_would_keep(kernels):
    def row(impl, kernel, us, tokens=1):
        return {"op": "RMSNorm", "dtype": "bfloat16", "tokens": tokens, "hidden": 8192, "impl": impl,
                "kernel": kernel, "median_us": us}

    rows = [row("normfuse", "normfuse_rms_norm_t256_r1_c4", 6.0), row("tactic2", "normfuse_rms_norm_t512_r1_c2", 4.5),
            row("torch_fused", None, 12.0), row("normfuse", "normfuse_rms_norm_t256_r1_c4", 50.0, tokens=4096)]
    lines = kernels.tactic_report(rows)
    [cell] = [line for line in lines if line.startswith("| RMSNorm")]  # the 4096-token cell timed no tactic
    assert "1: rms_norm_t256_r1_c4 6.00; 2: rms_norm_t512_r1_c2 4.50" in cell
    assert cell.endswith("| 2 | 25% |")
    assert kernels.tactic_report(rows[-1:]) == []  # without --tactics, no table
    assert kernels.parse_args(["--quick", "--tactics"]).tactics


def test_split_report_compares_the_table_with_the_fastest_cluster_layout(kernels):
    def row(impl, kernel, us, tokens=1):
        return {"op": "AddRMSNorm", "dtype": "bfloat16", "tokens": tokens, "hidden": 16384, "impl": impl,
                "kernel": kernel, "median_us": us}

    rows = [row("normfuse", "normfuse_add_rms_norm_t1024_r1_c2", 9.0),
            row("split[256x2x4]", "normfuse_add_rms_norm_t256_r1_c2_s4", 6.0),
            row("split[128x2x8]", "normfuse_add_rms_norm_t128_r1_c2_s8", 5.0),
            row("normfuse", "normfuse_add_rms_norm_t1024_r1_c2", 80.0, tokens=4096)]
    lines = kernels.split_report(rows, empty_us=4.0)
    [cell] = [line for line in lines if line.startswith("| AddRMSNorm")]  # 4096 tokens timed no split
    assert cell == ("| AddRMSNorm | bfloat16 | 1x16384 | 9.00 (+5.00) | 128x2x8 | 5.00 (+1.00) | 1.80x | "
                    "128x2x8: 5.00; 256x2x4: 6.00 |")
    assert kernels.split_report(rows[:1], empty_us=4.0) == []  # without --split, no table
    args = kernels.parse_args(["--quick", "--split"])
    assert args.split and kernels.split_label((128, 2, 1, 8)) == "split[128x2x8]"


def test_a_layout_is_compared_with_the_table_kernel(timing):
    """Within twice the op tolerance (both are within it of the float64 reference), the same NaN
    and the same Inf agree; a wrong element, a NaN on one side only or a flipped Inf do not."""
    import torch

    table = [torch.tensor([[1.0, -2.0, float("nan"), float("inf")]], dtype=torch.bfloat16)]
    close = [table[0].clone()]
    close[0][0, 0] = 1.0 + 2 ** -6  # one bf16 step above 1 is 2^-7: two steps, inside 2 x 1.6e-2
    assert timing.agreement(close, table, "bfloat16") == {"max_abs_diff_vs_table": 2 ** -6, "agrees_with_table": True}
    for index, value in (((0, 1), -2.125), ((0, 0), float("nan")), ((0, 3), float("-inf"))):
        wrong = [table[0].clone()]
        wrong[0][index] = value
        assert not timing.agreement(wrong, table, "bfloat16")["agrees_with_table"], (index, value)
    long = torch.zeros(5, 7, dtype=torch.bfloat16)
    wrong_last = long.clone()
    wrong_last[4, 6] = 1.0
    timing.AGREEMENT_CHUNK, chunk = 4, timing.AGREEMENT_CHUNK  # in chunks: the last element is still seen
    try:
        assert timing.agreement([wrong_last], [long], "bfloat16") == {"max_abs_diff_vs_table": 1.0, "agrees_with_table": False}
        assert timing.agreement([long], [long], "bfloat16")["agrees_with_table"]
    finally:
        timing.AGREEMENT_CHUNK = chunk
    two = [table[0].clone(), table[0].clone() * 2]  # the Add forms: y and the sum, both compared
    assert timing.agreement(two, [table[0], table[0] * 2], "bfloat16")["agrees_with_table"]
    assert not timing.agreement(two, [table[0], table[0] * 3], "bfloat16")["agrees_with_table"]


def test_a_disagreeing_layout_is_reported_and_left_out_of_the_tables(kernels):
    def row(impl, us, **extra):
        return {"op": "RMSNorm", "dtype": "bfloat16", "tokens": 1, "hidden": 8192, "impl": impl,
                "kernel": f"k_{impl}", "median_us": us, **extra}

    rows = [row("normfuse", 6.0), row("tactic2", 4.5, agrees_with_table=True, max_abs_diff_vs_table=0.0078),
            row("tactic3", 1.0, agrees_with_table=False, max_abs_diff_vs_table=3.5)]
    [cell] = [line for line in kernels.tactic_report(rows) if line.startswith("| RMSNorm")]
    assert "tactic3" not in cell and "k_tactic3" not in cell and cell.endswith("| 2 | 25% |")
    wrong = kernels.disagreement_report(rows)
    assert wrong[1].startswith("LAYOUTS THAT DISAGREE") and wrong[-1] == "| RMSNorm | bfloat16 | 1x8192 | tactic3 | k_tactic3 | 3.5 |"
    assert kernels.disagreement_report(rows[:2]) == []
    assert kernels.tactic_report(rows[::2]) == []  # the only alternative was wrong: no tactic table


def test_the_flush_is_a_write_or_a_read_of_the_whole_buffer(timing, kernels):
    """dirty: the buffer written (L2 left full of modified lines); clean: only read, so nothing in
    L2 is left modified for the timed kernel to write back."""
    import torch

    timer = object.__new__(timing.Timer)
    for mode, after in (("dirty", 0), ("clean", 1)):
        timer.flush_mode, timer.flush_buf = mode, torch.ones(64, dtype=torch.int8)
        timer.flush()
        assert torch.all(timer.flush_buf == after), mode
    with pytest.raises(ValueError, match="flush mode 'warm'"):
        timing.Timer("warm")
    assert kernels.parse_args([]).flush == "dirty" and kernels.parse_args(["--flush", "clean"]).flush == "clean"


def test_run_compares_each_layout_once_timed_and_frees_its_outputs(kernels, monkeypatch, tmp_path, capsys):
    """kernels.run end to end on the CPU: the "launches" write known outputs (one layout writes
    wrong ones, one cannot be prepared), the timer hands out fixed times. Each alternative is
    prepared only when its turn comes, so at most one alternative's outputs exist at a time."""
    import torch

    live = []  # outputs of alternatives alive when the next is prepared

    class Cfg:
        def __init__(self, kernel):
            self.kernel = kernel

    def launch(op, x, res, gamma, beta, layout=None):
        import gc

        gc.collect()
        live.append(sum(1 for o in alive if o() is not None))
        if layout == (1024, 1):
            raise RuntimeError("no such variant")
        outs = [x.clone() + (1 if layout == (512, 2) else 0)]
        if layout is not None:
            import weakref

            alive.append(weakref.ref(outs[0]))
        return (lambda: None), Cfg(f"k{layout}"), outs

    alive = []

    class Timer:
        def __init__(self, flush_mode):
            self.flush_mode = flush_mode

        def times_us(self, fn, budget_s, flush=True):
            fn()
            return [10.0, 11.0, 12.0]

    monkeypatch.setattr(kernels, "Timer", Timer)
    monkeypatch.setattr(kernels, "normfuse_launch", launch)
    monkeypatch.setattr(kernels, "device_info", lambda: {"name": "stand-in"})
    monkeypatch.setattr(kernels, "reference_timings", lambda timer: {"copy": {"tbps": 3.0}})
    monkeypatch.setattr(kernels, "SameSizeCopy", lambda timer, budget: (lambda nbytes: 2.5))
    monkeypatch.setattr(kernels, "tensors", lambda op, dtype, tokens, hidden: (
        torch.ones(tokens, hidden, dtype=torch.bfloat16), None, torch.ones(hidden, dtype=torch.bfloat16), None))
    monkeypatch.setattr(kernels, "candidate_layouts", lambda dtype, hidden: [(256, 2), (512, 2), (1024, 1)])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    args = kernels.parse_args(["--quick", "--tune", "--tokens", "4096", "--hidden", "4096", "--ops", "RMSNorm",
                               "--compile-dtypes", "--flush", "clean"])
    args.partial = tmp_path / "partial.json"
    data = kernels.run(args)
    by_impl = {r["impl"]: r for r in data["results"]}
    assert set(by_impl) == {"normfuse", "normfuse[256x2]", "normfuse[512x2]", "torch_fused", "torch_unfused"}
    assert by_impl["normfuse[256x2]"]["agrees_with_table"] and by_impl["normfuse[256x2]"]["max_abs_diff_vs_table"] == 0.0
    assert not by_impl["normfuse[512x2]"]["agrees_with_table"]
    assert "agrees_with_table" not in by_impl["normfuse"] and "agrees_with_table" not in by_impl["torch_fused"]
    assert live == [0, 0, 0, 0]  # the table's launch, then each alternative with none alive before it
    out = capsys.readouterr().out
    assert "normfuse[1024x1] failed: RuntimeError: no such variant" in out
    assert "normfuse[512x2] DISAGREES with the table's kernel" in out
    partial = json.loads(args.partial.read_text())  # judged alone if the run is stopped: references too
    assert data["flush"] == "clean" and partial["results"] and partial["copy"] == {"tbps": 3.0} and partial["flush"] == "clean"
    assert "LAYOUTS THAT DISAGREE" in kernels.disagreement_report(data["results"])[1]
