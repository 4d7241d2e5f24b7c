"""bench/gpu_session.sh, the prepared command for a lent GPU: it must run through on a machine
without one (saying what each step did), fit one device call, and its two test steps must split
the GPU suite."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"


def session_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NORMFUSE_CACHE_DIR"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # this interpreter first
    return {**env, **extra}


def test_the_session_runs_through_without_a_gpu_and_logs_every_step(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT)], env=session_env(OUT=str(tmp_path), STEPS="new-variants decode profile"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "session.log").read_text()
    assert re.search(r"== new-variants \(at most \d+s\): .*pytest .*tests/gpu -k", log)
    assert re.search(r"== new-variants: exit 5 after \d+s", log)  # pytest's "no tests ran": all skipped
    assert re.search(r"== decode: exit 1 after \d+s", log)  # bench/kernels.py needs CUDA
    assert re.search(r"== profile: exit 1 after \d+s", log)  # no ncu here, or no GPU under it
    for skipped in ("decode-ab", "bandwidth", "short-rows", "proven-kernels"):
        assert f"== {skipped}: not in STEPS, skipped" in log
    assert re.search(r"== PTX cache entries: \d+ at the start, \d+ at the end", log)
    assert "== done after" in log
    with tarfile.open(tmp_path / "results.tar.gz") as results:
        assert "results" in results.getnames()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.tar.gz", "session.log"]


def collected(expression: str, fake_cupy: Path) -> tuple[list[str], int]:
    """(selected test ids, total) of the GPU suite for a -k expression, collected with a stand-in
    cupy module (the GPU tests skip at import without one; nothing runs)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-k", expression], cwd=ROOT, env=session_env(PYTHONPATH=str(fake_cupy)),
                          capture_output=True, text=True, timeout=120)
    m = re.search(r"(\d+)/(\d+) tests collected", done.stdout)
    assert m, done.stdout[-2000:]
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert len(ids) == int(m.group(1))
    return ids, int(m.group(2))


def test_its_two_test_steps_split_the_gpu_suite(tmp_path):
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text("")
    new = re.search(r'^NEW="([^"]+)"$', SCRIPT.read_text(), re.M).group(1)
    first, total = collected(new, tmp_path)
    rest, _ = collected(f"not ({new})", tmp_path)
    assert len(first) + len(rest) == total and first and rest
    for name in ("test_split_row_variants", "test_row_loop_variants", "test_every_tensorrt_tactic_layout"):
        assert any(f"::{name}[" in i for i in first) and not any(f"::{name}[" in i for i in rest), name
    assert not any("::test_against_reference[" in i for i in first)


def test_its_steps_fit_one_device_call_together():
    """The device tool stops a command at 600 s. The script's BUDGET must leave room for the final
    archive; every fixed step at its limit, plus the seconds each may take to be killed, must leave
    room in BUDGET for unpacking the PTX cache; the last step takes what remains."""
    script = SCRIPT.read_text()
    budget = int(re.search(r"^BUDGET=\$\{BUDGET:-(\d+)\}", script, re.M).group(1))
    assert budget <= 600 - 20
    named = re.findall(r"^step ([\w-]+) ", script, re.M)
    default = re.search(r'^STEPS=\$\{STEPS:-"([^"]+)"\}', script, re.M).group(1).split()
    assert named == default  # every step runs by default, in the order of the script
    fixed = [int(n) for n in re.findall(r"^step [\w-]+ (\d+) ", script, re.M)]
    assert len(fixed) == len(named) - 1
    assert re.search(r"^step proven-kernels \$\(\(BUDGET - SECONDS - 5\)\) ", script, re.M)
    kill_after = int(re.search(r"timeout --kill-after=(\d+)", script).group(1))
    assert sum(fixed) + kill_after * len(fixed) <= budget - 15


def test_the_last_step_gets_what_is_left_of_the_budget(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT)], env=session_env(OUT=str(tmp_path), STEPS="proven-kernels", BUDGET="12"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "session.log").read_text()
    assert "== proven-kernels: no time left, skipped" in log  # 12 - 5 s: under the 10 s a step needs


def bench_steps() -> dict[str, list[str]]:
    """Each step that runs a bench/ script: its name and the script's arguments, as bash passes them."""
    script = re.sub(r"\\\n\s*", " ", SCRIPT.read_text())  # continuation lines joined
    out = {}
    for m in re.finditer(r'^step ([\w-]+) \S+ "\$PY" bench/(\w+)\.py (.*)$', script, re.M):
        out[m.group(1)] = [m.group(2)] + shlex.split(m.group(3).replace("$WORK", "/tmp/work"))
    return out


def test_every_bench_step_takes_its_options(bench_script):
    """A usage error would cost a step of the one device call: each bench step's arguments parse."""
    steps = bench_steps()
    assert set(steps) == {"decode", "decode-ab", "bandwidth", "short-rows", "profile"}
    kernels, profile = bench_script("kernels"), bench_script("kernel_profile")
    for name, (bench, *args) in steps.items():
        if bench == "kernels":
            parsed = kernels.parse_args(args)
            assert parsed.out == Path("/tmp/work/results" + ("" if name in ("decode", "bandwidth") else f"/{name}")), name
        else:
            assert bench == "kernel_profile"
            cells = [profile.parse_cell(c) for c in profile.parser().parse_args(args).cells]
            assert {c["op"] for c in cells} == {"RMSNorm", "LayerNorm"}
    assert [v.label for v in kernels.parse_args(steps["decode-ab"][1:]).variants] == [
        "worktree", "worktree+NORMFUSE_AB_PARAMS_EARLY"]
