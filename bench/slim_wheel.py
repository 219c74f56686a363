"""Drop the parts of the diffusers wheel this project never imports, so that the wheels a GPU
machine without internet needs (`.whl/`, see README "Reproducing the GPU numbers") fit beside
the repository in a size-limited transfer.

    python bench/slim_wheel.py .whl/diffusers-0.42.1-py3-none-any.whl

Rewrites the wheel in place (temporary name, then renamed) without the packages in DROP, and
drops their lines from the wheel's RECORD so that it stays a valid wheel. Why these: the
project uses diffusers' UNets, schedulers, EMAModel and optimization only; the pipelines and
modular pipelines are two thirds of the compressed wheel (4.1 of 6.2 MB in diffusers 0.42.1).
diffusers imports its subpackages lazily, so the rest never looks for them: the whole test
suite passed with a slimmed 0.42.1 installed in front of the full one (PYTHONPATH), and
tests/test_bench.py checks the slimming itself.
"""
import argparse
import fnmatch
import os
import zipfile
from pathlib import Path

# fnmatch patterns ("*" also matches "/"). pipelines/ keeps its own modules: training_utils
# imports DiffusionPipeline from there.
DROP = ("diffusers/pipelines/*/*", "diffusers/modular_pipelines/*", "diffusers/commands/*",
        "diffusers/models/controlnets/*")


def dropped(name, drop=DROP):
    return any(fnmatch.fnmatch(name, pattern) for pattern in drop)


def slim(src, dst=None, drop=DROP):
    """Copy wheel src to dst (default: src, in place) without the members drop matches.
    Returns (bytes before, bytes after)."""
    src = Path(src)
    dst = Path(dst) if dst else src
    tmp = dst.with_name(f".{dst.name}.tmp")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if dropped(info.filename, drop):
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not dropped(line.decode().split(",")[0], drop))
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    before = src.stat().st_size
    os.replace(tmp, dst)
    return before, dst.stat().st_size


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheel", help="the diffusers wheel (rewritten in place)")
    args = p.parse_args(argv)
    if not zipfile.is_zipfile(args.wheel):
        raise SystemExit(f"{args.wheel}: not a wheel (expected a .whl zip file)")
    before, after = slim(args.wheel)
    print(f"{args.wheel}: {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
