"""Kernel source versions for bench/kernels.py --sources, --variant-dir, --save-sources and --static:
what a version is (a git revision, "worktree" or a directory, optionally with +NAME[=VALUE]
compile-time switches), its sources fetched into a directory, and its one-kernel module compiled
and checked against the current launch table. No GPU.

    python bench/kernels.py --sources 59deae0^ --save-sources DIR     # a revision's sources, for a copy without git history

Imported by bench/kernels.py, bench/kernel_ab.py and bench/kernel_static.py.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plugins import build, config  # noqa: E402

SOURCE_FILES = (build.HEADER, *(f"{family}.cu" for family in config.FAMILY.values()))
_SWITCH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(=[A-Za-z0-9_.+-]*)?")


class VariantError(ValueError):
    """A source version that cannot be compared with the current launch table, and why."""


@dataclass
class SourceVariant:
    label: str  # as given on the command line, e.g. "59deae0^" or "HEAD+NORMFUSE_AB_NO_PREFETCH"
    base: str  # a git revision, "worktree" or a directory
    defines: tuple[str, ...] = ()
    commit: str | None = None  # the revision resolved (None for the work tree or a directory)
    source_dir: Path | None = None  # where its sources are (None: plugins/ of the work tree)
    sources_sha256: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"label": self.label, "base": self.base, "commit": self.commit, "defines": list(self.defines),
                "source_dir": None if self.source_dir is None else str(self.source_dir),
                "sources_sha256": self.sources_sha256}


def parse_sources(items: list[str] | None, dirs: list[str] | None = None) -> list[SourceVariant]:
    """--sources items (comma- or space-separated) and --variant-dir directories, in order.

    Item: BASE[+NAME[=VALUE]...], BASE a git revision, "worktree" or a directory of sources."""
    out: list[SourceVariant] = []
    for item in [part for raw in items or [] for part in raw.split(",") if part.strip()] + list(dirs or []):
        item = item.strip()
        base, *switches = item.split("+") if not Path(item).is_dir() else (item,)
        if not base:
            raise VariantError(f"{item!r}: no revision or directory before the '+'")
        for d in switches:
            if not _SWITCH.fullmatch(d):
                raise VariantError(f"{item!r}: bad switch {d!r}; expected +NAME or +NAME=VALUE")
        out.append(SourceVariant(label=item, base=base, defines=tuple(switches)))
    labels = [v.label for v in out]
    if len(set(labels)) != len(labels):
        raise VariantError(f"a variant is given twice: {labels}")
    return out


def materialise(variant: SourceVariant, workdir: Path, repo: Path = ROOT) -> SourceVariant:
    """Resolve the variant's sources: `git show REV:plugins/<file>` into workdir, or check a directory."""
    if variant.base == "worktree":
        variant.source_dir = None
        src = build.SOURCE_DIR
    elif Path(variant.base).is_dir():
        src = variant.source_dir = Path(variant.base).resolve()
        missing = [f for f in SOURCE_FILES if not (src / f).is_file()]
        if missing:
            raise VariantError(f"{variant.label}: directory {src} lacks {', '.join(missing)}")
        if (src / "COMMIT").is_file():  # written by --save-sources
            variant.commit = (src / "COMMIT").read_text().split()[0]
    else:
        found = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{variant.base}^{{commit}}"],
                               capture_output=True, text=True)
        if found.returncode != 0:
            raise VariantError(f"{variant.label}: {variant.base!r} is neither a git revision of {repo} nor a directory"
                               " (a shallow clone lacks older revisions: git fetch --unshallow; a copy without git"
                               " history takes directories written by --save-sources where the history is)")
        variant.commit = found.stdout.strip()
        src = variant.source_dir = workdir / variant.commit[:12]
        src.mkdir(parents=True, exist_ok=True)
        for f in SOURCE_FILES:
            shown = subprocess.run(["git", "-C", str(repo), "show", f"{variant.commit}:plugins/{f}"],
                                   capture_output=True)
            if shown.returncode != 0:
                raise VariantError(f"{variant.label}: revision {variant.commit[:12]} has no plugins/{f} (the kernels "
                                   "were split into these files in a6d837a; older revisions cannot be built here)")
            (src / f).write_bytes(shown.stdout)
    texts = {f: (src / f).read_bytes() for f in SOURCE_FILES}
    for d in variant.defines:
        name = d.partition("=")[0]
        if not any(re.search(rb"\b" + name.encode() + rb"\b", t) for t in texts.values()):
            raise VariantError(f"{variant.label}: the sources of {variant.base} never mention {name}, so the "
                               "switch would change nothing (use 'worktree' for switches not committed yet)")
    variant.sources_sha256 = {f: hashlib.sha256(t).hexdigest()[:16] for f, t in texts.items()}
    return variant


def save_sources(variants: list[SourceVariant], dest_dir: Path) -> None:
    """Write each revision's sources (materialised) to dest_dir/<commit>, with a COMMIT file that
    `materialise` reads back, for --variant-dir on a copy of the project without git history."""
    for v in variants:
        if v.commit is None:
            continue
        dest = dest_dir / v.commit[:12]
        dest.mkdir(parents=True, exist_ok=True)
        for f in SOURCE_FILES:
            shutil.copyfile(v.source_dir / f, dest / f)
        (dest / "COMMIT").write_text(f"{v.commit} {v.base}\n")
        print(f"{v.label}: {dest}  (use: --variant-dir {dest}, or --sources {dest}+SWITCH)")


def entry_contract(ptx: str, kernel: str) -> tuple[list[str], int | None] | None:
    """(parameter types, .maxntid) of `kernel` in `ptx`; None if there is no such entry point."""
    m = re.search(rf"\.entry {re.escape(kernel)}\((.*?)\)\s*(\.maxntid\s+(\d+))?", ptx, re.S)
    if not m:
        return None
    kinds = [p.split()[1].lstrip(".") for p in m.group(1).split(",") if p.strip()]
    return kinds, int(m.group(3)) if m.group(3) else None


def variant_ptx(variant: SourceVariant, op: str, x_dtype: str, g_dtype: str, cfg: config.LaunchConfig,
                arch: str) -> str:
    """The variant's one-kernel module for `cfg`, after checking it fits the current launch contract:
    the same entry point and parameter types as the work tree's kernel, launch bounds that admit
    cfg.block, and no dynamic shared memory (the launch table passes none). Raises VariantError."""
    try:
        ptx = build.ptx_for_launch(op, x_dtype, g_dtype, cfg, arch, variant.source_dir, variant.defines)
    except build.ToolchainError as exc:
        raise VariantError(f"{variant.label}: does not compile with the current plugins/build.py unit "
                           f"for {cfg.kernel}:\n{exc}") from exc
    ref = entry_contract(build.ptx_for_launch(op, x_dtype, g_dtype, cfg, arch, None, ()), cfg.kernel)
    got = entry_contract(ptx, cfg.kernel)
    if got is None:
        raise VariantError(f"{variant.label}: no entry point {cfg.kernel}: its kernel names or NORMFUSE_VARIANTS "
                           "do not follow the current plugins/config.py")
    if ref is not None and got[0] != ref[0]:
        raise VariantError(f"{variant.label}: {cfg.kernel} takes ({', '.join(got[0])}), the current launch passes "
                           f"({', '.join(ref[0])}): a different kernel signature, refused")
    if got[1] is not None and got[1] < cfg.block:
        raise VariantError(f"{variant.label}: {cfg.kernel} is bounded to {got[1]} threads a block, the launch "
                           f"table uses {cfg.block}")
    if re.search(r"\.extern\s+\.shared", ptx):
        raise VariantError(f"{variant.label}: {cfg.kernel} uses dynamic shared memory, which the launch table "
                           "does not pass")
    return ptx
