"""The `edgepipe` command: a thin layer over the library. Errors the user can fix are one line + exit 2."""
from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys

from edgepipe import UserError, __version__


def cmd_run(args) -> int:
    from edgepipe.pipeline import run
    from edgepipe.recipe import load_recipe
    resume = ["stages.train.resume=true"] if getattr(args, "resume", False) else []
    recipe = load_recipe(args.recipe, profile=args.profile, overrides=(args.set or []) + resume)
    report = run(recipe, args.out)
    print(f"report: {args.out}/report.md  manifest: {args.out}/manifest.json  default variant: {report['default_variant']}")
    return 0


def cmd_eval(args) -> int:
    from edgepipe.runtime.evaluate import evaluate
    from edgepipe.runtime.model import Classifier
    clf = Classifier(args.dir, variant=args.variant, backend=args.backend)
    result = evaluate(clf, args.data, batch_size=args.batch_size)
    if not args.per_image:
        result.pop("predictions", None)
        result.pop("per_class_top1", None)
    print(json.dumps(result))
    return 0


def cmd_bench(args) -> int:
    from edgepipe.benchmarks.bench import main as bench_main
    return bench_main(args)


def cmd_build_engine(args) -> int:
    from edgepipe.compile.tensorrt_engine import main as build_main
    return build_main(args)


def cmd_camera(args) -> int:
    from edgepipe.runtime.camera import main as camera_main
    return camera_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgepipe", description="Fine-tune, prune, quantize, compile and benchmark image classifiers for edge devices.")
    p.add_argument("--version", action="version", version=f"edgepipe {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a recipe: stages -> artifacts + manifest + report")
    r.add_argument("recipe", help="recipe YAML (e.g. recipes/default.yaml) or the name of a built-in recipe")
    r.add_argument("--out", required=True, help="output folder (artifacts, manifest.json, report)")
    r.add_argument("--profile", help="profile from the recipe's profiles: section (e.g. quick, full)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one recipe value, e.g. data.evaluation=val.csv")
    r.add_argument("--resume", action="store_true", help="continue an interrupted training from its last epoch checkpoint")
    r.set_defaults(fn=cmd_run)

    e = sub.add_parser("eval", help="top-1/top-5 of one variant on labeled images (prints one JSON object)")
    e.add_argument("dir", help="artifact folder with manifest.json")
    e.add_argument("--data", required=True, help="CSV with header file,class_index, or an ImageFolder tree named by labels")
    e.add_argument("--variant")
    e.add_argument("--backend", default="auto", choices=["auto", "openvino", "onnxruntime", "tensorrt"])
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--per-image", action="store_true", help="include per-image predictions and per-class top-1")
    e.set_defaults(fn=cmd_eval)

    b = sub.add_parser("bench", help="accuracy x latency for every variant and backend; budgets gate CI")
    b.add_argument("dir")
    b.add_argument("--data", help="labeled CSV / ImageFolder (top-1) or an image folder (agreement with fp32)")
    b.add_argument("--budgets", help="budgets YAML; exit 1 when any budget fails")
    b.add_argument("--junit", help="write JUnit XML here")
    b.add_argument("--video", help="also run the camera pipeline on this video (glass-to-glass)")
    b.add_argument("--iterations", type=int, default=200, help="timed batch-1 calls per variant (more until the p90 settles)")
    b.add_argument("--warmup", type=int, default=20, help="untimed calls before timing")
    b.add_argument("--min-class-images", type=int, default=10,
                   help="worst per-class drop only over classes with at least this many images (default 10)")
    b.add_argument("--out", help="report folder: report.md, report.json, pareto.png (default: DIR/bench)")
    b.set_defaults(fn=cmd_bench)

    t = sub.add_parser("build-engine", help="build a TensorRT engine on the Jetson / GPU host from the artifact's ONNX")
    t.add_argument("dir")
    t.add_argument("--precision", choices=["fp16", "int8"], default="fp16")
    t.add_argument("--workspace", type=int, default=1024, help="workspace in MB")
    t.add_argument("--batch", default="1,1,1", help="MIN,OPT,MAX batch for the optimization profile")
    t.add_argument("--rebuild", action="store_true")
    t.set_defaults(fn=cmd_build_engine)

    # prefix_chars="+": every --flag after `camera` is passed through to runtime/camera.py untouched
    c = sub.add_parser("camera", help="same as python runtime/camera.py", add_help=False, prefix_chars="+")
    c.add_argument("rest", nargs=argparse.REMAINDER)
    c.set_defaults(fn=cmd_camera)
    return p


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "camera":  # camera.py has its own clean-stop handling
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # `kill` stops a run like Ctrl-C: steps kept
    try:
        return args.fn(args)
    except UserError as exc:
        print(f"edgepipe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgepipe: interrupted; completed steps are kept and a re-run resumes from them", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, read-only, file too large, I/O error: the machine, not a bug
        if os.environ.get("EDGEPIPE_DEBUG"):
            raise
        print(f"edgepipe: error: {os_error_line(exc)}", file=sys.stderr)
        return 1


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
