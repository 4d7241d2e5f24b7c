"""bench/gpu_session.sh, the prepared commands for a lent GPU (two calls): each must run through
on a machine without one (saying what each step did) and fit a device call; together they must
fit the session's device time, and their test steps must split the GPU suite."""
from __future__ import annotations

import importlib
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


def run_call(call: str, out: Path, **env: str) -> tuple[str, str]:
    """(session.log, stdout) of `bash bench/gpu_session.sh CALL` here, which must exit 0."""
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["bash", str(SCRIPT), call], env=session_env(OUT=str(out), **env),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return (out / "session.log").read_text(), done.stdout


def test_call_1_runs_through_without_a_gpu_and_logs_every_step(tmp_path):
    log, stdout = run_call("1", tmp_path, STEPS="clean-flush profile new-variants")
    assert log.startswith("call 1 of 2, budget 345s")
    assert re.search(r"== clean-flush: exit 1 after \d+s", log)  # bench/kernels.py needs CUDA
    assert re.search(r"== profile: exit 1 after \d+s", log)  # no ncu here, or no GPU under it
    assert re.search(r"== new-variants \(at most \d+s\): .*pytest .*tests/gpu -k", log)
    assert re.search(r"== new-variants: exit 5 after \d+s", log)  # pytest's "no tests ran": all skipped
    for skipped in ("bandwidth", "bandwidth-ab", "short-rows"):
        assert f"== {skipped}: not in STEPS, skipped" in log
    assert re.search(r"== PTX cache entries: \d+ at the start, \d+ at the end", log)
    assert "== done after" in log
    assert "== targets" not in log  # no timing step wrote results: nothing to judge
    assert "== clean-flush: exit 1" in stdout  # the summary, where the device tool's reply shows it
    with tarfile.open(tmp_path / "results.tar.gz") as results:
        assert "results" in results.getnames()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.tar.gz", "session.log"]


def test_call_2_runs_its_own_steps_and_a_bad_call_or_budget_is_refused(tmp_path):
    log, _ = run_call("2", tmp_path, STEPS="decode")
    assert log.startswith("call 2 of 2, budget 405s")
    assert re.search(r"== decode \(at most 100s\): .*bench/kernels.py --quick --tactics --split", log)
    for skipped in ("split-variants", "decode-ab", "split-ab", "proven-kernels"):
        assert f"== {skipped}: not in STEPS, skipped" in log
    for argv, env in ((["3"], {}), (["2"], {"BUDGET": "590"})):
        bad = subprocess.run(["bash", str(SCRIPT), *argv], env=session_env(OUT=str(tmp_path), **env),
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr


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


def test_the_split_exchange_ab_runs_only_after_the_split_variants_pass(tmp_path):
    """Timing split layouts whose tests failed (here: skipped, no GPU) would spend the call on
    kernels that compute something else; run alone (STEPS=split-ab) the A/B step still runs."""
    log, _ = run_call("2", tmp_path / "after", STEPS="split-variants split-ab")
    assert re.search(r"== split-variants: exit 5 after \d+s", log)  # pytest: no tests ran
    assert "== split-ab: skipped, the split-row variants did not pass their GPU tests" in log
    log, _ = run_call("2", tmp_path / "alone", STEPS="split-ab")
    assert re.search(r"== split-ab \(at most 40s\): .*--sources worktree,worktree\+NORMFUSE_AB_SPLIT_MBARRIER --split", log)
    assert re.search(r"== split-ab: exit 1 after \d+s", log)  # bench/kernels.py needs CUDA


def test_the_test_steps_split_the_gpu_suite(tmp_path):
    """Call 1 tests the new variants without clusters, call 2 the split rows and then the rest: every
    GPU test in exactly one step, and no cluster launch in call 1."""
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text("")
    script = SCRIPT.read_text()
    new_1 = re.search(r'^NEW_1="([^"]+)"$', script, re.M).group(1)
    new_2 = re.search(r'^NEW_2="([^"]+)"$', script, re.M).group(1)
    first, total = collected(new_1, tmp_path)
    split, _ = collected(new_2, tmp_path)
    rest, _ = collected(f"not ({new_1} or {new_2})", tmp_path)
    assert len(first) + len(split) + len(rest) == total and first and split and rest
    assert not set(first) & set(split)
    for name, step in (("test_row_loop_variants", first), ("test_every_tensorrt_tactic_layout", first),
                       ("test_split_row_variants", split)):
        assert all(f"::{name}[" not in i for other in (first, split, rest) if other is not step for i in other), name
        assert any(f"::{name}[" in i for i in step), name
    assert not any("split" in i for i in first) and not any("::test_against_reference[" in i for i in first + split)
    call_1 = script[script.index("call_1() {"):script.index("call_2() {")]
    assert "--split" not in call_1 and "$NEW_2" not in call_1


def calls() -> dict[str, tuple[int, list[str], str]]:
    """{call: (default BUDGET, default STEPS, the body of its function)}."""
    script = SCRIPT.read_text()
    out = {}
    for m in re.finditer(r'^    (\d)\) STEPS=\$\{STEPS:-"([^"]+)"\}; BUDGET=\$\{BUDGET:-(\d+)\} ;;$', script, re.M):
        body = script[script.index(f"call_{m.group(1)}() {{"):]
        out[m.group(1)] = (int(m.group(3)), m.group(2).split(), body[:body.index("\n}\n")])
    return out


def test_each_call_fits_a_device_call_and_both_fit_the_session():
    """The device tool stops a command at 600 s; a session has 900 s of device time, a machine's
    start (about 90 s) and the transfers included. In each call, every fixed step at its limit,
    plus the seconds each may take to be killed, must leave room in BUDGET for unpacking the PTX
    cache; the last step takes what remains."""
    found = calls()
    assert sorted(found) == ["1", "2"]
    assert sum(budget for budget, _, _ in found.values()) <= 900 - 90 - 2 * 30
    kill_after = int(re.search(r"timeout --kill-after=(\d+)", SCRIPT.read_text()).group(1))
    for call, (budget, steps, body) in found.items():
        assert budget <= 600 - 20
        named = re.findall(r"^    step ([\w-]+) ", body, re.M)
        assert named == steps, call  # every step runs by default, in the order of the script
        fixed = [int(n) for n in re.findall(r"^    step [\w-]+ (\d+) ", body, re.M)]
        assert len(fixed) == len(named) - 1, call
        assert re.search(r"^    step [\w-]+ \$\(\(BUDGET - SECONDS - 5\)\) ", body, re.M), call
        assert sum(fixed) + kill_after * len(fixed) <= budget - 15 - 30, call  # 30 s at least for the last


def test_the_last_step_gets_what_is_left_of_the_budget(tmp_path):
    log, _ = run_call("2", tmp_path, STEPS="proven-kernels", BUDGET="12")
    assert "== proven-kernels: no time left, skipped" in log  # 12 - 5 s: under the 10 s a step needs


def bench_steps() -> dict[str, list[str]]:
    """Each step that runs a bench/ script: its name and the script's arguments, as bash passes them
    (the script's own variables substituted)."""
    raw = SCRIPT.read_text()
    script = re.sub(r"\\\n\s*", " ", raw)  # a step's continuation lines joined
    variables = {"WORK": "/tmp/work"}
    # plain assignments (NAME=value, continued by a backslash at a line's end, as bash joins them)
    for m in re.finditer(r"^([A-Z_]+)=([^$\s(][^\n]*?(?:\\\n[^\n]*)*)$", raw, re.M):
        variables.setdefault(m.group(1), m.group(2).replace("\\\n", ""))
    out = {}
    for m in re.finditer(r'^    step ([\w-]+) \S+ "\$PY" bench/(\w+)\.py (.*)$', script, re.M):
        args = re.sub(r"\$(\w+)", lambda v: variables.get(v.group(1), v.group(0)), m.group(3))
        out[m.group(1)] = [m.group(2)] + shlex.split(args)
    return out


def test_every_bench_step_takes_its_options(bench_script, tmp_path):
    """A usage error would cost a step of a device call: each bench step's arguments parse, each
    writes to its own folder (the result files of one --quick run would overwrite another's), and
    each switch an A/B step names is one the kernel sources know."""
    steps = bench_steps()
    assert set(steps) == {"bandwidth", "clean-flush", "bandwidth-ab", "short-rows", "profile", "decode", "decode-ab",
                          "split-ab"}
    kernels, profile = bench_script("kernels"), bench_script("kernel_profile")
    sources = importlib.import_module("kernel_sources")
    for name, (bench, *args) in steps.items():
        assert not any("$" in a for a in args), (name, args)  # every variable substituted
        if bench == "kernels":
            parsed = kernels.parse_args(args)
            assert parsed.out == Path("/tmp/work/results" + ("" if name == "bandwidth" else f"/{name}")), name
            assert parsed.variants or parsed.compile_dtypes == [], name  # no torch.compile: minutes of a call
            for v in parsed.variants:
                sources.materialise(v, tmp_path / name)  # refuses a switch the sources never mention
        else:
            assert bench == "kernel_profile"
            cells = [profile.parse_cell(c) for c in profile.parser().parse_args(args).cells]
            assert {c["op"] for c in cells} == {"RMSNorm", "LayerNorm"}
    assert kernels.parse_args(steps["clean-flush"][1:]).flush == "clean"
    decode = kernels.parse_args(steps["decode"][1:])
    assert decode.tactics and decode.split and decode.tokens == [1, 32]
    assert [v.label for v in kernels.parse_args(steps["decode-ab"][1:]).variants] == [
        "worktree", "worktree+NORMFUSE_AB_PARAMS_EARLY"]
    assert len(kernels.parse_args(steps["bandwidth-ab"][1:]).variants) == 4
    split_ab = kernels.parse_args(steps["split-ab"][1:])
    assert split_ab.split and [v.label for v in split_ab.variants] == ["worktree", "worktree+NORMFUSE_AB_SPLIT_MBARRIER"]
