"""The kernels compile to PTX with nvcc and assemble with ptxas for every supported architecture.

A broken kernel fails here, on a machine without a GPU. Each module is compiled once per session
(and cached on disk by plugins.build, keyed by the sources).
"""
from __future__ import annotations

import os
import re
import shutil

import pytest

from normops import OPS
from plugins import build, config

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not on PATH")

# (x dtype, gamma dtype): the full variant list for the common case, and one each for the others
FULL = ("bfloat16", "float32")
FUNCTION = re.compile(r"Function properties for (\S+)\n\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
                      r"(\d+) bytes spill loads\nptxas info\s+: Used (\d+) registers")


def module_kernels(op: str, arch: str) -> set[str]:
    """The entry points of a module holding every variant for `arch` (x bf16)."""
    split = config.split_variants(FULL[0]) if config.supports_split(arch) else []
    return {config.kernel_name(op, *v) for v in config.variants(FULL[0]) + split}


def compiled_and_assembled(work, compile_one) -> dict:
    """{item: (ptx, ptxas report)} for each item of `work`, one nvcc + ptxas per core at a time
    (each pair takes seconds: most of this file's time on a cold cache)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item):
        ptx, arch = compile_one(item)
        return ptx, build.ptxas_check(ptx, arch)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(work, pool.map(one, work)))


@pytest.fixture(scope="session")
def full_modules():
    """{(op, arch): (ptx, ptxas report)} for every variant of each op, x bf16 / gamma fp32."""
    work = [(op, arch) for op in OPS for arch in build.ARCHES]
    return compiled_and_assembled(work, lambda w: (build.get_ptx(w[0], *FULL, arch=w[1]), w[1]))


@needs_nvcc
@pytest.mark.parametrize("arch", build.ARCHES)
@pytest.mark.parametrize("op", list(OPS))
def test_every_variant_assembles(full_modules, op, arch):
    """Every variant, and on sm_90 the split-row variants too (thread block clusters need it)."""
    ptx, report = full_modules[(op, arch)]
    assert f".target {arch}" in ptx
    found = {m.group(1) for m in FUNCTION.finditer(report)}
    assert found == module_kernels(op, arch)


@needs_nvcc
@pytest.mark.parametrize("op", list(OPS))
def test_layouts_the_table_picks_do_not_spill_much(full_modules, op):
    """Registers hold the row: the variants used up to hidden 16384 keep nearly everything there (a few spills where ptxas trades them for occupancy,
    e.g. AddLayerNorm 512x4, still the fastest layout measured at hidden 8192)."""
    _, report = full_modules[(op, "sm_90")]
    spills = {m.group(1): int(m.group(3)) + int(m.group(4)) for m in FUNCTION.finditer(report)}
    for hidden in (768, 1024, 4096, 8192, 16384):
        cfg = config.launch_config(op, FULL[0], 1, hidden)
        assert spills[cfg.kernel] <= 256, (cfg.kernel, spills[cfg.kernel])


MAXNTID = re.compile(r"\.entry (\w+)\((?:[^)]*)\)\s*\.maxntid (\d+), 1, 1", re.S)


@needs_nvcc
@pytest.mark.parametrize("op", list(OPS))
def test_every_kernel_is_built_for_the_block_it_is_launched_with(full_modules, op):
    """__launch_bounds__ (PTX .maxntid) is the block config.launch_config launches: a larger
    block would fail to launch, a smaller bound would waste the registers ptxas could use."""
    ptx, _ = full_modules[(op, "sm_90")]
    declared = dict((m.group(1), int(m.group(2))) for m in MAXNTID.finditer(ptx))
    expected = {}
    for tpr, rpb, c in config.variants(FULL[0]):
        cfg = config.launch_config(op, FULL[0], 1, None, layout=(tpr, c, rpb // config.groups_per_block(tpr)))
        expected[cfg.kernel] = cfg.block
    for tpr, _, c, ctas in config.split_variants(FULL[0]):
        cfg = config.launch_config(op, FULL[0], 1, None, layout=(tpr, c, 1, ctas))
        expected[cfg.kernel] = cfg.block
    assert declared == expected


CLUSTER = re.compile(r"\.entry (\w+)\((?:[^)]*)\)\s*\.maxntid \d+, 1, 1\s*\.explicitcluster\s*"
                     r"\.reqnctapercluster (\d+), 1, 1", re.S)


@needs_nvcc
@pytest.mark.parametrize("op", list(OPS))
def test_split_row_variants_declare_their_cluster(full_modules, op):
    """A split-row kernel fixes its cluster size at compile time (PTX .reqnctapercluster), so a
    plain launch of rows * S blocks, which is all TensorRT's KernelLaunchParams can express, runs
    each row's S blocks as one cluster; no other kernel declares a cluster."""
    ptx, _ = full_modules[(op, "sm_90")]
    declared = dict((m.group(1), int(m.group(2))) for m in CLUSTER.finditer(ptx))
    expected = {}
    for tpr, _, c, ctas in config.split_variants(FULL[0]):
        cfg = config.launch_config(op, FULL[0], 3, 4096, layout=(tpr, c, 1, ctas))
        assert cfg.grid == 3 * ctas and cfg.block == tpr
        expected[cfg.kernel] = ctas
    assert declared == expected
    assert ptx.count(".reqnctapercluster") == len(expected)
    sm80, _ = full_modules[(op, "sm_80")]
    assert ".reqnctapercluster" not in sm80 and "cluster" not in sm80


@needs_nvcc
@pytest.mark.parametrize("op", list(OPS))
def test_split_row_variants_do_not_spill(full_modules, op):
    """A slice of at most two 16-byte slots, with its gamma/beta, stays in registers (ptxas
    spills a few words in some of them, at 64-77 registers, CUDA 13.0; nothing like a row)."""
    _, report = full_modules[(op, "sm_90")]
    spills = {m.group(1): int(m.group(3)) + int(m.group(4)) for m in FUNCTION.finditer(report)}
    for v in config.split_variants(FULL[0]):
        name = config.kernel_name(op, *v)
        assert spills[name] <= 48, (name, spills[name])


@needs_nvcc
def test_split_row_variants_need_sm_90():
    cfg = config.launch_config("RMSNorm", "bfloat16", 1, 8192, layout=(128, 1, 1, 8))
    with pytest.raises(ValueError, match="split-row variant: it needs thread block clusters, sm_90"):
        build.ptx_for_launch("RMSNorm", "bfloat16", "bfloat16", cfg, arch="sm_80")
    ptx = build.ptx_for_launch("RMSNorm", "bfloat16", "bfloat16", cfg, arch="sm_90")
    assert f".entry {cfg.kernel}(" in ptx and ptx.count(".entry") == 1
    build.ptxas_check(ptx, "sm_90")


@needs_nvcc
@pytest.mark.parametrize("op", list(OPS))
def test_row_loop_variants_of_short_rows_do_not_spill(full_modules, op):
    """The row-loop variants meant for short rows (one or two 16-byte slots a thread) keep the
    row, the next row's loads and gamma/beta in registers."""
    _, report = full_modules[(op, "sm_90")]
    spills = {m.group(1): int(m.group(3)) + int(m.group(4)) for m in FUNCTION.finditer(report)}
    for tpr, rpb, c in config.variants(FULL[0]):
        if rpb > config.groups_per_block(tpr) and c <= 2:
            name = config.kernel_name(op, tpr, rpb, c)
            assert spills[name] <= 64, (name, spills[name])


@needs_nvcc
@pytest.mark.parametrize("x_dtype,g_dtype", [("float16", "float16"), ("float32", "float32"), ("bfloat16", "bfloat16")])
def test_other_dtypes_assemble(x_dtype, g_dtype):
    for op in ("AddLayerNorm", "RMSNorm"):
        cfg = config.launch_config(op, x_dtype, 1, 4096)
        ptx = build.ptx_for_launch(op, x_dtype, g_dtype, cfg, arch="sm_80")
        assert f".entry {cfg.kernel}(" in ptx
        # parameter order of TensorRT's AOT plugins: inputs, rows, hidden, eps bits, outputs
        n_in = len(OPS[op].inputs) + (1 if OPS[op].centered else 0)
        params = re.search(rf"\.entry {cfg.kernel}\((.*?)\)", ptx, re.S).group(1)
        kinds = [p.split()[1].lstrip(".") for p in params.split(",")]
        n_out = len(OPS[op].outputs)
        assert kinds == ["u64"] * n_in + ["u32"] * 3 + ["u64"] * n_out
        build.ptxas_check(ptx, "sm_80")


def test_cache_key_follows_the_sources(monkeypatch, tmp_path):
    a = build.module_source("RMSNorm", "bfloat16", None, (256, 1, 4))
    b = build.module_source("RMSNorm", "bfloat16", None, (128, 2, 4))
    assert a != b and "normfuse" not in a.split("#include")[0].lower().replace("normfuse_", "")
    with pytest.raises(ValueError):
        build.module_source("RMSNorm", "bfloat16", None, (256, 1, 8))
    flags = build.nvcc_flags("sm_80")
    key = build._cache_key("RMSNorm", a, flags)
    assert key != build._cache_key("RMSNorm", b, flags) and key != build._cache_key("RMSNorm", a, build.nvcc_flags("sm_90"))
    sources = (build.source_path("RMSNorm").name, build.HEADER)
    for edited in sources:  # an edited kernel or header is a new key
        for name in sources:
            (tmp_path / name).write_bytes((build.SOURCE_DIR / name).read_bytes())
        (tmp_path / edited).write_text((tmp_path / edited).read_text() + "\n// edited\n")
        with monkeypatch.context() as m:
            m.setattr(build, "SOURCE_DIR", tmp_path)
            assert build._cache_key("RMSNorm", a, flags) != key, edited


def test_missing_nvcc_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "nvcc_path", lambda: None)
    build._get_ptx.cache_clear()
    try:
        with pytest.raises(build.ToolchainError, match="nvcc"):
            build.get_ptx("RMSNorm", "float16", arch="sm_80", variant=(32, 8, 1))
    finally:
        build._get_ptx.cache_clear()


@needs_nvcc
def test_ptx_says_which_nvcc_release_wrote_it():
    ptx = build.get_ptx("RMSNorm", "float16", arch="sm_80", variant=(32, 8, 1))
    assert build.ptx_release(ptx) == build.nvcc_release() is not None
    assert build.ptx_release(".version 9.0\n.target sm_80\n") is None


def test_a_driver_older_than_the_ptx_is_refused_in_one_line():
    build.check_driver_loads((13, 0), (13, 0), "x is")
    build.check_driver_loads((12, 8), (13, 1), "x is")
    build.check_driver_loads(None, (12, 0), "x is")  # unknown on either side: TensorRT or the driver says
    build.check_driver_loads((13, 0), None, "x is")
    with pytest.raises(build.ToolchainError) as caught:
        build.check_driver_loads((13, 0), (12, 8), "the kernel is")
    assert str(caught.value) == ("the kernel is PTX written by nvcc of CUDA 13.0, and this GPU's driver supports "
                                 "CUDA 12.8 at most, so it cannot load it: put an nvcc of CUDA 12.8 or older first "
                                 "on PATH, or update the driver")


@needs_nvcc
def test_cached_ptx_of_another_nvcc_release_is_compiled_again(monkeypatch, tmp_path):
    """An nvcc picked to suit an older driver must not be handed the PTX its newer predecessor
    cached; a cache shipped for use as it is ($NORMFUSE_PTX_ANY_NVCC) is served whatever wrote it."""
    monkeypatch.setenv("NORMFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("NORMFUSE_PTX_ANY_NVCC", raising=False)
    build._get_ptx.cache_clear()
    try:
        fresh = build.get_ptx("RMSNorm", "float16", arch="sm_80", variant=(32, 8, 1))
        (cached,) = tmp_path.glob("*.ptx")
        major, minor = build.nvcc_release()
        other = fresh.replace(f"release {major}.{minor}", f"release {major + 1}.{minor}", 1)
        cached.write_text(other)
        build._get_ptx.cache_clear()
        again = build.get_ptx("RMSNorm", "float16", arch="sm_80", variant=(32, 8, 1))
        # compiled anew (its module id differs from run to run), and the cache holds it
        assert build.ptx_release(again) == (major, minor) and cached.read_text() == again
        cached.write_text(other)
        build._get_ptx.cache_clear()
        monkeypatch.setenv("NORMFUSE_PTX_ANY_NVCC", "1")
        assert build.get_ptx("RMSNorm", "float16", arch="sm_80", variant=(32, 8, 1)) == other
    finally:
        build._get_ptx.cache_clear()


def test_kernels_fingerprint_follows_the_switches_and_sources(monkeypatch, tmp_path):
    monkeypatch.delenv("NORMFUSE_AB_DEFINES", raising=False)
    plain = build.kernels_fingerprint()
    monkeypatch.setenv("NORMFUSE_AB_DEFINES", "NORMFUSE_AB_PLAIN_LOADS")
    assert build.kernels_fingerprint() != plain
    monkeypatch.delenv("NORMFUSE_AB_DEFINES")
    for name in [p.name for p in build.SOURCE_DIR.glob("*.cu")] + [build.HEADER, "config.py", "trt.py"]:
        (tmp_path / name).write_bytes((build.SOURCE_DIR / name).read_bytes())
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    assert build.kernels_fingerprint() == plain
    (tmp_path / "config.py").write_text((tmp_path / "config.py").read_text() + "\n# another launch table\n")
    assert build.kernels_fingerprint() != plain


# The compile-time A/B switches of norm_common.cuh (off by default; bench/kernels.py --sources
# worktree+NAME times them). NORMFUSE_AB_PARAMS_EARLY replaces the prefetch that
# NORMFUSE_AB_NO_PREFETCH removes, so it is built on its own (with the split-row variants' switch).
AB_SWITCHES = (
    ("NORMFUSE_AB_PLAIN_LOADS", "NORMFUSE_AB_NO_PREFETCH", "NORMFUSE_AB_NO_TRAILING_SYNC",
     "NORMFUSE_AB_LN_ONE_REDUCTION", "NORMFUSE_AB_LOOP_PARAMS_PER_ROW", "NORMFUSE_AB_MIN_THREADS_PER_SM=1024"),
    ("NORMFUSE_AB_PARAMS_EARLY", "NORMFUSE_AB_SPLIT_MBARRIER"),
)


def test_every_ab_switch_is_built_here():
    named = set(re.findall(r"\bNORMFUSE_AB_\w+", (build.SOURCE_DIR / build.HEADER).read_text()))
    assert named == {d.partition("=")[0] for group in AB_SWITCHES for d in group}


@pytest.fixture(scope="session")
def switched_modules():
    """{(op, switches): (ptx, ptxas report)}: every variant with each switch group, sm_90."""
    work = [(op, d) for op in OPS for d in AB_SWITCHES]
    return compiled_and_assembled(work, lambda w: (build.get_ptx(w[0], *FULL, arch="sm_90", defines=w[1]), "sm_90"))


# The A/B switches are compile-time experiments for the GPU session (bench/kernel_ab.py), not the
# kernels the plugins ship: assembling every variant with each group costs a minute on a cold
# cache, so it runs under -m slow (the shipped kernels are assembled above on every run).
@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("defines", AB_SWITCHES, ids=lambda d: "+".join(x.removeprefix("NORMFUSE_AB_") for x in d))
@pytest.mark.parametrize("op", list(OPS))
def test_ab_switches_assemble(switched_modules, full_modules, op, defines):
    """Every variant builds with the switches (sm_90), the table's layouts also for sm_80, and the
    switched module is another kernel than the default one."""
    ptx, report = switched_modules[(op, defines)]
    found = {m.group(1) for m in FUNCTION.finditer(report)}
    assert found == module_kernels(op, "sm_90")
    assert ptx != full_modules[(op, "sm_90")][0]
    for hidden in (4096, 8192):
        cfg = config.launch_config(op, FULL[0], 1, hidden)
        build.ptxas_check(build.ptx_for_launch(op, *FULL, cfg, arch="sm_80", defines=defines), "sm_80")


def test_ab_defines_from_the_environment(monkeypatch):
    monkeypatch.setenv("NORMFUSE_AB_DEFINES", "NORMFUSE_AB_NO_PREFETCH, NORMFUSE_AB_MIN_THREADS_PER_SM=1024")
    assert build.env_defines() == ("NORMFUSE_AB_NO_PREFETCH", "NORMFUSE_AB_MIN_THREADS_PER_SM=1024")
    monkeypatch.delenv("NORMFUSE_AB_DEFINES")
    assert build.env_defines() == ()


@needs_nvcc
def test_environment_switches_reach_the_launch_module_unless_defines_are_given(monkeypatch):
    cfg = config.launch_config("RMSNorm", "bfloat16", 1, 4096)
    default = build.ptx_for_launch("RMSNorm", "bfloat16", None, cfg, arch="sm_80")
    monkeypatch.setenv("NORMFUSE_AB_DEFINES", "NORMFUSE_AB_NO_PREFETCH")
    switched = build.ptx_for_launch("RMSNorm", "bfloat16", None, cfg, arch="sm_80")
    assert "prefetch.global.L2" in default and "prefetch.global.L2" not in switched
    assert build.ptx_for_launch("RMSNorm", "bfloat16", None, cfg, arch="sm_80", defines=()) == default


@needs_nvcc
@pytest.mark.parametrize("op", ["RMSNorm", "AddLayerNorm"])
def test_split_mbarrier_switch_exchanges_without_a_gpu_wide_fence(op):
    """The default split-row exchange reads the peers' shared memory between two cluster barriers,
    whose release arrivals ptxas makes MEMBAR.ALL.GPU fences; NORMFUSE_AB_SPLIT_MBARRIER pushes the
    partials with st.async into an mbarrier-counted inbox: one cluster barrier, arrived at relaxed
    before the loads."""
    cfg = config.launch_config(op, FULL[0], 1, 8192, layout=(128, 1, 1, 8))
    default = build.ptx_for_launch(op, *FULL, cfg, arch="sm_90", defines=())
    switched = build.ptx_for_launch(op, *FULL, cfg, arch="sm_90", defines=("NORMFUSE_AB_SPLIT_MBARRIER",))
    assert "barrier.cluster.arrive;" in default and "st.async" not in default
    assert "st.async.shared::cluster.mbarrier::complete_tx::bytes.b32" in switched
    assert switched.count("barrier.cluster.arrive.relaxed;") == 1 and "barrier.cluster.arrive;" not in switched
    build.ptxas_check(switched, "sm_90")
