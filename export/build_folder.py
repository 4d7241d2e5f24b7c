"""export.build on a folder: the chain on every model in it, then an encoder-decoder decoded as a pair.

    python -m export.build --onnx t5/        # Optimum's layout: encoder_model.onnx, decoder_model_merged.onnx, ...

Each `*.onnx` of the folder is rewritten, validated, timed and reported on its own, as
`--onnx MODEL` would, into `<out>/<model name>/` (but for the decoder's two halves where the merged
decoder holding both is there too). A `--dim` applies to the models that have the
name (an encoder has no past_decoder_sequence_length); one that none has is a flag error. Where the
folder holds an encoder-decoder (`export.decoder_files.resolve_folder`: encoder_model.onnx and a merged
decoder, or the decoder's two halves), the pair is then greedy-decoded on each ONNX Runtime backend: the reference decoder
reading the reference encoder's states against the fused decoder reading the fused encoder's, as
the two would be served. `<out>/report.json` and `report.md` sum it up, with a model per row. A
model that cannot be built (a shape it cannot take) is named there with its error, and the others
are still built; the exit status is then 1 (2 where a model was refused a flag).
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

from .errors import NormfuseError, UsageError
from .dims import sizes_per_model
from .files import atomic_path, models_in, require_writable, write_json, write_text


class FolderPipeline:
    def __init__(self, args, console):
        self.args = args
        self.console = console
        self.skipped: list[dict] = []
        self.serving_failed = False
        self.not_decoded: dict[str, str] = {}  # backend: why its encoder-decoder pair was not decoded there

    def run(self) -> int:
        from .build import environment

        a = self.args
        folder = Path(a.onnx)
        models = models_in(folder)
        models = self.without_merged_halves(models)
        out = require_writable(a.out or f"build/{folder.resolve().name}", folder=True)
        shares = sizes_per_model(models, a.dim)
        from .build import Pipeline

        Pipeline(a, self.console).check_backends()  # a --backend that cannot run here: one line, before any model
        if a.exclude:  # a name no model of the folder has: refused before any model is built
            from .rewrite.rewriter import check_excluded_before_writing

            check_excluded_before_writing(models, a.exclude, str(folder), target="tensorrt")
        self.console.print(f"folder {folder}: {len(models)} models ({', '.join(m.name for m in models)}), each built "
                           f"into {out}/<model name>/")
        pipelines, statuses, errors = {}, {}, {}
        for index, model in enumerate(models, 1):
            self.console.rule(f"[bold]{model.name}[/] ({index}/{len(models)})")
            try:
                pipelines[model], statuses[model] = self.build_one(model, out / model.stem, shares[model])
            except NormfuseError as exc:  # this model cannot be built (a shape it cannot take, say): the others still are
                errors[model] = exc
                self.console.print(f"[red]{model.name} not built[/]: {exc}")
        self.console.rule("[bold]the folder")
        built = [pipeline for pipeline in pipelines.values() if pipeline.report is not None]
        backends = built[0].backends if built else []
        decoding = self.decode_pair(folder, pipelines, backends, shares, errors)
        self.withdraw_triton_entries(pipelines, decoding)
        serving = self.write_serving_folders(folder, models, out, pipelines, statuses, errors, backends, decoding)
        rows = [self.row(model, out / model.stem, pipelines[model], statuses[model]) if model not in errors
                else {"model": model.name, "out": str(out / model.stem), "exit_status": errors[model].exit_code,
                      "error": str(errors[model])}
                for model in models]
        # what the models' builds skipped (the GPU stages, mostly), each said once
        said = {(s["stage"], s["reason"]) for s in self.skipped}
        for pipeline in built:
            for s in pipeline.report["skipped"]:
                if (s["stage"], s["reason"]) not in said and s["stage"] != "greedy decoding":
                    said.add((s["stage"], s["reason"]))
                    self.skipped.append(s)
        report = {"folder": str(folder), "models": rows, "decode": decoding, "serving": serving, "skipped": self.skipped,
                  "environment": environment()}
        paths = write_folder_report(report, out)
        print_folder_summary(report, self.console)
        self.console.print(f"report: {paths['md']} (also {', '.join(p.name for k, p in paths.items() if k != 'md')}; "
                           "each model's own report in its folder)")
        from .decode import decoded_alike

        failed = [row["model"] for row in rows if row["exit_status"]]
        if failed:
            self.console.print(f"[red]FAILED[/]: {', '.join(failed)} (see the table and their reports)")
        # 2 where a model was refused a flag (as for one model), else 1 for any failure
        status = max((row["exit_status"] for row in rows), default=0)
        if self.serving_failed:
            status = max(status, 1)
        if not all(decoded_alike(d["agreement"]) for d in decoding):
            self.console.print("[red]decoding FAILED[/]: the fused pair chose other tokens or its scores are out of tolerance")
            status = max(status, 1)
        return status

    def without_merged_halves(self, models: list[Path]) -> list[Path]:
        """Optimum writes an encoder-decoder's decoder three times: its two halves and the merged
        form holding both as the branches of an If, which is the one served. The halves are then
        not built again (each builds alone with --onnx FILE)."""
        from .decoder_files import FOLDER_DECODERS, FOLDER_HALVES

        names = {model.name for model in models}
        if FOLDER_DECODERS[0] not in names or not set(FOLDER_HALVES) <= names:
            return models
        self.skipped.append({"stage": f"build of {' and '.join(FOLDER_HALVES)}", "reason": (
            f"the two branches of {FOLDER_DECODERS[0]}, which is built; build either alone with --onnx FILE")})
        return [model for model in models if model.name not in FOLDER_HALVES]

    def build_one(self, model: Path, out: Path, dims: list[tuple]):
        """The whole chain on one model, as `--onnx MODEL --out OUT` with its share of the --dim flags."""
        from .build import Pipeline

        args = copy.copy(self.args)
        args.onnx, args.out, args.dim, args.folder = str(model), str(out), dims, str(Path(self.args.onnx))
        pipeline = Pipeline(args, self.console)
        return pipeline, pipeline.run()

    def decode_pair(self, folder: Path, pipelines: dict, backends: list[str], shares: dict, errors: dict) -> list[dict]:
        """An encoder-decoder's reference pair against its fused pair, on each ONNX Runtime backend."""
        from .build import skip_ops_on_the_cpu
        from .decode import decode
        from .decoder_files import FOLDER_HALVES, Halves, resolve_folder

        a = self.args
        try:
            decoder, encoder = resolve_folder(folder)
        except UsageError:  # no decoder: nothing to decode
            return []
        if encoder is None or not a.decode_tokens:
            return []  # a decoder-only model.onnx was decoded by its own build
        if decoder in errors or encoder in errors:
            self.skipped.append({"stage": "greedy decoding of the encoder-decoder",
                                 "reason": f"{(decoder if decoder in errors else encoder).name} was not built"})
            return []
        halves = [folder / name for name in FOLDER_HALVES] if decoder.is_dir() else []  # no merged form: its halves
        if any(half in errors for half in halves):
            self.skipped.append({"stage": "greedy decoding of the encoder-decoder",
                                 "reason": f"{next(h for h in halves if h in errors).name} was not built"})
            return []

        def fused_form(path: Path, backend: str) -> Path:
            return pipelines[path].decoded.get(backend) or path  # the reference itself where nothing changed

        records = []
        for backend in (b for b in backends if b.startswith("ort-")):
            fused_encoder = fused_form(encoder, backend)
            fused_decoder = Halves(*(fused_form(half, backend) for half in halves)) if halves else fused_form(decoder, backend)
            unchanged = [fused_form(p, backend) == p for p in (halves or [decoder])] + [fused_encoder == encoder]
            decoder_key = halves[0] if halves else decoder
            dtype = pipelines[decoder_key].report["config"]["dtype"]
            cannot = pipelines[decoder_key].cannot_run(backend, dtype) or pipelines[encoder].cannot_run(backend, dtype)
            if cannot:
                self.skipped.append({"stage": f"{backend} greedy decoding", "reason": cannot})
                continue
            if all(unchanged):
                self.skipped.append({"stage": f"{backend} greedy decoding", "reason": (
                    "nothing to compare: the rewrite changed neither the encoder nor the decoder for this backend "
                    "(their norms are single ops already, or they have none)")})
                continue
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if backend == "ort-cuda" else ["CPUExecutionProvider"]
            dims = {name: size.opt for model in (halves or [decoder]) + [encoder] for name, size in shares[model]}
            named = " + ".join(h.name for h in halves) if halves else decoder.name
            what = f"greedy decoding on {backend}: {a.decode_tokens} tokens, {encoder.name} + {named}, reference vs fused"
            with self.console.status(what + " ..."):
                try:
                    record = decode(decoder, fused_decoder, prompt=16, tokens=a.decode_tokens, seed=a.seed,
                                    providers=providers, rounds=2, dims=dims, encoder_path=encoder,
                                    compare_encoder_path=fused_encoder)
                except NormfuseError as exc:  # named like Optimum's files, but not a pair export.decode can drive
                    self.skipped.append({"stage": f"{backend} greedy decoding", "reason": str(exc)})
                    self.not_decoded[backend] = str(exc)
                    continue
            self.console.print(f"[green]done[/] {what}")
            forms = [fused_decoder.first, fused_decoder.with_past] if halves else [fused_decoder]
            records.append({"backend": backend, **record, **skip_ops_on_the_cpu(backend, *forms, fused_encoder)})
        return records

    def withdraw_triton_entries(self, pipelines: dict, decoding: list[dict]) -> None:
        """The fused models' Triton entries (--triton-repo) go again where the encoder-decoder pair
        decoded otherwise than the reference's or could not be decoded: each model passed on its
        own, but the pair's tokens are not the reference's, or were never checked."""
        why = self.pair_unchecked_why(decoding, [*{d["backend"] for d in decoding}, *self.not_decoded])
        if why is None:
            return
        for pipeline in pipelines.values():
            for entry in pipeline.triton_fused:
                if entry.is_dir():
                    shutil.rmtree(entry)
                    self.console.print(f"    [yellow]{entry.name} removed from the Triton repository[/]: {why}")
                    self.skipped.append({"stage": f"Triton model {entry.name}", "reason": f"{why}; removed"})
                if pipeline.report is not None and str(entry) in pipeline.report.get("triton", []):
                    pipeline.report["triton"].remove(str(entry))

    def pair_unchecked_why(self, decoding: list[dict], backends: list[str]) -> str | None:
        """Why the fused encoder-decoder pair is not to be served on `backends`, or None: it chose
        other tokens than the reference's on one, or could not be decoded there."""
        from .decode import decoded_alike

        for backend in backends:
            if not all(decoded_alike(d["agreement"]) for d in decoding if d["backend"] == backend):
                return "the fused encoder-decoder chose other tokens than the reference's, or scores out of tolerance"
            if backend in self.not_decoded:
                return ("the encoder-decoder pair could not be decoded, so the fused pair is unchecked "
                        f"({self.not_decoded[backend]})")
        return None

    def write_serving_folders(self, folder: Path, models: list[Path], out: Path, pipelines: dict, statuses: dict,
                              errors: dict, backends: list[str], decoding: list[dict]) -> list[dict]:
        """`<out>/serve-<backend>/` for each ONNX Runtime backend on which every model of the folder
        was built and passed, and the pair decoded alike: the folder to load in the source's place."""
        from .serving_folder import serving_folder_name, write_serving_folder

        written = []
        for backend in (b for b in backends if b.startswith("ort-")):
            target = out / serving_folder_name(backend)
            why = self.why_not_served(models, pipelines, statuses, errors, backend) \
                or self.pair_unchecked_why(decoding, [backend])
            if why:
                if target.is_dir():  # an earlier run's: left there, it would stand for models that no longer pass
                    shutil.rmtree(target)
                    why += f" (the earlier {target.name}/ was removed)"
                self.skipped.append({"stage": f"{backend} serving folder {target.name}", "reason": why})
                continue
            forms = {model.name: pipelines[model].served[backend] for model in models if model in pipelines}
            what = f"{backend} serving folder: {len(forms)} models as {folder.name} has them"
            try:
                with self.console.status(what + " ..."):
                    record = write_serving_folder(folder, forms, target)
            except NormfuseError as exc:  # two models' weight files at odds, a full disk: the builds stand
                self.console.print(f"[red]{backend} serving folder not written[/]: {exc}")
                self.skipped.append({"stage": f"{backend} serving folder {target.name}", "reason": str(exc)})
                self.serving_failed = True
                continue
            self.console.print(f"[green]done[/] {what}: {target}")
            written.append({"backend": backend, **record})
        return written

    @staticmethod
    def why_not_served(models: list[Path], pipelines: dict, statuses: dict, errors: dict, backend: str) -> str | None:
        """Why no serving folder is written for `backend`, or None when it is."""
        if errors:
            return f"{next(iter(errors)).name} was not built"
        failed = [model.name for model in models if model in statuses and statuses[model]]
        if failed:
            return f"{', '.join(failed)} failed (see the table); only models that passed are put up to be served"
        changed = False
        for model in pipelines:  # the halves the merged decoder holds were not built, and are not served
            pipeline = pipelines[model]
            served = pipeline.served.get(backend)
            if served is None or served == model:
                continue
            changed = True
            if not any(p["candidate"].endswith("@" + backend) for p in pipeline.report["validation"]):
                return f"{model.name}'s fused form was not validated on {backend}"
        if not changed:
            return "the rewrite changed no model for it: serve the source folder as it is"
        return None

    @staticmethod
    def row(model: Path, out: Path, pipeline, status: int) -> dict:
        """One model's line of the folder's report."""
        from .bench import speedup
        from .report import bench_pairs

        report = pipeline.report
        rw = report["rewrite"]
        return {"model": model.name, "out": str(out), "exit_status": status, "fused": rw["fused"],
                "expected_norms": rw["expected_norms"], "counts": rw["counts"],
                "fused_cpu": rw["onnxruntime_cpu"]["fused"],
                "validation_passed": all(p["passed"] for p in report["validation"]),
                "validation_pairs": len(report["validation"]),
                "speedup": {backend: round(speedup(ref, fused), 4) for backend, ref, fused in bench_pairs(report)}
                if rw["fused"] else {}}


def markdown(report: dict) -> str:
    from .report import decoding_markdown
    from .rewrite import describe_counts

    lines = [f"# normfuse report: folder `{report['folder']}`", "",
             "Each model was built on its own; its report is in its folder.", "",
             "| model | norms fused (TensorRT form) | ONNX Runtime CPU form | validation | p50 speed-up | report |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in report["models"]:
        if "error" in row:
            lines.append(f"| `{row['model']}` | **not built**: {row['error'].replace('|', chr(92) + '|')} | | | | |")
            continue
        speed = ", ".join(f"{b} {x:.2f}x" for b, x in row["speedup"].items()) or "-"
        lines.append(f"| `{row['model']}` | {row['fused']}/{row['expected_norms']} ({describe_counts(row['counts'])}) | "
                     f"{row['fused_cpu']} fused | {'pass' if row['validation_passed'] else '**FAIL**'} "
                     f"({row['validation_pairs']} pairs) | {speed} | `{Path(row['out']).name}/report.md` |")
    lines += decoding_markdown(report["decode"])
    lines += serving_markdown(report["serving"], Path(report["folder"]))
    lines += ["", "## Skipped", ""]
    lines += [f"- **{s['stage']}**: {s['reason']}" for s in report["skipped"]] or ["- nothing"]
    lines += ["", "## Environment", "", ", ".join(f"{k} {v}" for k, v in report["environment"].items()), ""]
    return "\n".join(lines)


def serving_markdown(serving: list[dict], source: Path) -> list[str]:
    if not serving:
        return []
    lines = ["", "## Serving folders", "",
             f"Laid out as `{source.name}` is, each model in the form its backend serves; load one in the "
             "source's place.", "", "| backend | folder | models (from) | also copied |", "| --- | --- | --- | --- |"]
    for record in serving:
        models = "<br>".join(f"`{name}` ({_from(form, source)})" for name, form in record["models"].items())
        lines.append(f"| {record['backend']} | `{Path(record['folder']).name}/` | {models} | "
                     f"{', '.join(f'`{c}`' for c in record['copied']) or '-'} |")
    return lines


def _from(form: str, source: Path) -> str:
    """Where a served model came from, as the folder's report names it: `encoder_model/fused-cpu.onnx`,
    or the source's model itself."""
    path = Path(form)
    return "as given" if path.parent == source else f"`{path.parent.name}/{path.name}`"


def write_folder_report(report: dict, out: Path) -> dict[str, Path]:
    """report.json, report.md and, for a decoded pair, report.png (each decode step's time)."""
    paths = {"json": out / "report.json", "md": out / "report.md"}
    write_json(paths["json"], report)
    write_text(paths["md"], markdown(report))
    png = out / "report.png"
    if report["decode"]:
        plot_decoding(report["decode"], png)
        paths["png"] = png
    else:
        png.unlink(missing_ok=True)  # not one of an earlier run's
    return paths


def plot_decoding(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .decode_report import plot_steps

    fig, ax = plt.subplots(figsize=(7, 4))
    for record in records:
        plot_steps(ax, record, prefix=f"{record['backend']} " if len(records) > 1 else "")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def print_folder_summary(report: dict, console) -> None:
    from rich.table import Table

    from .report import print_decoding

    table = Table(title=f"folder {report['folder']}: each model built on its own")
    for col in ("model", "norms fused", "CPU form", "validation", "p50 speed-up"):
        table.add_column(col)
    for row in report["models"]:
        if "error" in row:
            table.add_row(row["model"], "[red]not built", "", "", "")
            continue
        table.add_row(row["model"], f"{row['fused']}/{row['expected_norms']}", f"{row['fused_cpu']} fused",
                      "[green]pass" if row["validation_passed"] else "[red]FAIL",
                      ", ".join(f"{b} {x:.2f}x" for b, x in row["speedup"].items()) or "-")
    console.print(table)
    print_decoding(report["decode"], console)
    for record in report["serving"]:
        console.print(f"serving folder for {record['backend']}: {record['folder']} ("
                      + ", ".join(f"{name} from {_from(form, Path(report['folder'])).strip('`')}" for name, form in record["models"].items())
                      + (f"; with {', '.join(record['copied'])}" if record["copied"] else "") + ")")
    for s in report["skipped"]:
        console.print(f"[yellow]skipped[/] {s['stage']}: {s['reason']}")
