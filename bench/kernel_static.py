"""Static analysis of kernel source versions, no GPU: ptxas -v registers, spills and shared memory
of each version's kernel for each cell's launch, the occupancy they allow, and SASS counts
(cuobjdump -sass, or nvdisasm) of the 16-byte in-register path the bench shapes take.

    python bench/kernels.py --sources HEAD,59deae0^ --static sm_90,sm_80 [--out DIR]

Needs nvcc and ptxas. Without cuobjdump or nvdisasm the table's SASS columns read n/a, with the
reason under the table and in each row's `sass` entry of kernels-static.json (written with --out).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernel_grid import candidate_layouts  # noqa: E402
from kernel_sources import SourceVariant, variant_ptx  # noqa: E402
from normops import OPS  # noqa: E402
from plugins import build, config  # noqa: E402

REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = {"sm_80": 2048, "sm_90": 2048}
MAX_BLOCKS_PER_SM = 32
_RESOURCES = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
                        r"ptxas info\s+: Used (\d+) registers([^\n]*)")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def occupancy(registers: int, block: int, arch: str, smem: int = 0) -> tuple[int, int]:
    """(blocks per SM, warps per SM) that registers and block size allow (registers are granted
    per warp in units of 256; shared memory here is tiny and not limiting)."""
    warps = -(-block // 32)
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    blocks = min(REGISTERS_PER_SM // (per_warp * warps), MAX_THREADS_PER_SM.get(arch, 2048) // (warps * 32),
                 MAX_BLOCKS_PER_SM)
    return blocks, blocks * warps


def sass_instructions(cubin: Path) -> list[tuple[int, str]]:
    """(address, instruction) of the cubin's SASS (cuobjdump -sass, or nvdisasm). A disassembler
    that is missing or fails is a ToolchainError (its columns then read n/a, with the reason)."""
    tool = shutil.which("cuobjdump")
    argv = [tool, "-sass", str(cubin)] if tool else None
    if not tool:
        tool = shutil.which("nvdisasm")
        if not tool:
            raise build.ToolchainError("neither cuobjdump nor nvdisasm is on PATH (pip install "
                                       "nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm puts both in nvidia/cu13/bin)")
        argv = [tool, "-hex", str(cubin)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        # e.g. cuobjdump without nvdisasm beside it: "Could not find executable file 'nvdisasm'"
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise build.ToolchainError(f"{Path(tool).name} failed: {reason}")
    return [(int(m.group(1), 16), m.group(2)) for m in _SASS_LINE.finditer(done.stdout)]


def _opcode(ins: str) -> str:
    return ins.split()[1] if ins.startswith("@") else ins.split()[0]


def sass_summary(instructions: list[tuple[int, str]]) -> dict:
    """Counts over the whole kernel and over its vectorised in-register path (from its first
    LDG.E.128 to the EXIT after its last STG.E.128): global loads and stores by width, barriers,
    shuffles, L2 prefetches (CCTL), backward branches (loops), and the parameter-load round trips
    after the last barrier (groups of loads each waiting on the store before it)."""
    ops = [_opcode(i) for _, i in instructions]

    def counts(seq: list[str]) -> dict:
        out: dict[str, int] = {}
        for op in seq:
            if op.startswith(("LDG", "STG", "BAR", "CCTL", "SHFL", "LDS", "STS")):
                out[op] = out.get(op, 0) + 1
        return out

    def backward(pairs) -> int:
        n = 0
        for addr, ins in pairs:
            m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", ins)
            if m and int(m.group(1), 16) <= addr:
                n += 1
        return n

    summary = {"instructions": len(ops), "whole": counts(ops), "loops": backward(instructions)}
    vec = [k for k, op in enumerate(ops) if op.startswith("LDG") and ".128" in op]
    st = [k for k, op in enumerate(ops) if op.startswith("STG") and ".128" in op]
    if vec and st:
        lo, hi = vec[0], st[-1]
        while hi < len(ops) - 1 and ops[hi] != "EXIT":
            hi += 1
        path = ops[lo:hi + 1]
        bars = [k for k, op in enumerate(path) if op.startswith("BAR")]
        tail = path[bars[-1] + 1:] if bars else path
        trips, loading = 0, False
        for op in tail:
            if op.startswith("LDG") and not loading:
                trips, loading = trips + 1, True
            elif op.startswith("STG"):
                loading = False
        summary.update({"vector_path": counts(path), "vector_path_instructions": len(path),
                        "vector_path_loops": backward(instructions[lo:hi + 1]),
                        "param_load_round_trips_after_last_barrier": trips})
    return summary


def static_analysis(variants: list[SourceVariant], arches: list[str], ops, dtype: str, hidden_list,
                    gamma_dtype: str | None = None, rows: int = 65536, tune: bool = False,
                    split: bool = False) -> list[dict]:
    """ptxas resources, occupancy and SASS counts of each variant's kernel for each cell's launch
    (with `tune`, also for every layout --tune times; with `split`, the split-row layouts --split
    times, on the architectures that have them)."""
    cells = []
    for op in ops:
        for hidden in hidden_list:
            layouts = [None] + (candidate_layouts(dtype, hidden) if tune else [])
            layouts += config.split_layouts(dtype, hidden) if split else []
            for cfg in dict.fromkeys(config.launch_config(op, dtype, rows, hidden, layout=lo) for lo in layouts):
                cells.append((op, hidden, cfg))
    g = gamma_dtype or dtype
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        for op, hidden, cfg in cells:
            for arch in arches:
                if cfg.ctas_per_row > 1 and not config.supports_split(arch):
                    continue  # split-row variants are compiled for sm_90 and newer only
                for v in variants:
                    report = build.ptxas_check(variant_ptx(v, op, dtype, g, cfg, arch), arch, cubin=cubin)
                    m = _RESOURCES.search(report)
                    regs = int(m.group(4))
                    found = re.search(r"(\d+) bytes smem", m.group(5))
                    smem = int(found.group(1)) if found else 0
                    blocks, warps = occupancy(regs, cfg.block, arch, smem)
                    row = {"op": op, "dtype": dtype, "gamma_dtype": g, "hidden": hidden, "arch": arch,
                           "variant": v.label, "kernel": cfg.kernel, "block": cfg.block, "registers": regs,
                           "spill_bytes": int(m.group(2)) + int(m.group(3)), "stack_bytes": int(m.group(1)),
                           "smem_bytes": smem, "blocks_per_sm": blocks, "warps_per_sm": warps,
                           # x (+ residual) bytes the resident blocks hold or have requested: a row
                           # per group, and in a row-loop variant also the next row it loads meanwhile
                           "input_bytes_per_sm": blocks * cfg.groups_per_block * (2 if cfg.rows_per_group > 1 else 1)
                           * hidden * config.ITEMSIZE[dtype] * (2 if OPS[op].has_residual else 1)}
                    try:
                        row["sass"] = sass_summary(sass_instructions(cubin))
                    except build.ToolchainError as exc:
                        row["sass"] = {"error": str(exc)}
                    out.append(row)
    return out


def report_static(rows: list[dict]) -> str:
    lines = ["static analysis (ptxas -v, cuobjdump -sass), not a measurement. Occupancy from registers and block "
             "size; input KiB/SM: x (+ residual) of the resident blocks' rows. Instruction counts are of the "
             "16-byte in-register path the bench shapes take (one row group per block, so per row): "
             "trips = dependent gamma/beta load round trips after the last barrier; loops = backward branches",
             "| op | hidden | arch | variant | kernel | regs | spill B | smem B | blocks/SM | warps/SM | input KiB/SM | "
             "LDG.128 | other LDG | STG.128 | BAR.SYNC | CCTL | SHFL | trips | loops |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    missing = sorted({r["sass"]["error"] for r in rows if "error" in r["sass"]})
    for r in rows:
        s = r["sass"]
        if "error" in s:  # no SASS tool (or it failed): no counts, rather than zeros that read as real
            lines.append(f"| {r['op']} | {r['hidden']} | {r['arch']} | {r['variant']} | {r['kernel']} | {r['registers']} | "
                         f"{r['spill_bytes']} | {r['smem_bytes']} | {r['blocks_per_sm']} | {r['warps_per_sm']} | "
                         f"{r['input_bytes_per_sm'] // 1024} | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |")
            continue
        vp = s.get("vector_path", {})
        ldg128 = sum(n for k, n in vp.items() if k.startswith("LDG") and ".128" in k)
        other = sum(n for k, n in vp.items() if k.startswith("LDG") and ".128" not in k)
        stg128 = sum(n for k, n in vp.items() if k.startswith("STG") and ".128" in k)
        bar = sum(n for k, n in vp.items() if k.startswith("BAR"))
        cctl = sum(n for k, n in vp.items() if k.startswith("CCTL"))
        shfl = sum(n for k, n in vp.items() if k.startswith("SHFL"))
        kinds = sorted({k.removeprefix("LDG.E.128").lstrip(".") or "plain" for k in vp if k.startswith("LDG.E.128")})
        lines.append(f"| {r['op']} | {r['hidden']} | {r['arch']} | {r['variant']} | {r['kernel']} | {r['registers']} | "
                     f"{r['spill_bytes']} | {r['smem_bytes']} | {r['blocks_per_sm']} | {r['warps_per_sm']} | "
                     f"{r['input_bytes_per_sm'] // 1024} | {ldg128} ({', '.join(kinds) or '-'}) | {other} | {stg128} | "
                     f"{bar} | {cctl} | {shfl} | {s.get('param_load_round_trips_after_last_barrier', '-')} | "
                     f"{s.get('vector_path_loops', '-')} |")
    lines += [f"SASS counts n/a: {why}" for why in missing]
    return "\n".join(lines)
