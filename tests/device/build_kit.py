"""`make device-kit`: build `.devcheck/`, what the GPU test machine needs beyond its image (<= 60 MiB).

That machine runs Python 3.12 with a CUDA torch, triton, transformers and a few more, reaches no
package registry, and gives the whole check 9 minutes. So the kit brings, built here:

    wheels/         the packages the checks import that the image lacks, for CPython 3.12 on x86_64:
                    binary wheels as PyPI has them (versions pinned by requirements-cpu.lock),
                    antlr4's sdist built into a wheel, and mamba-ssm built WITHOUT its CUDA extension
                    (only its Triton kernels are used; train/ops/backends/mamba_ssm.py imports it so)
    src/            causal-conv1d's source, its arch list cut to sm_90 (H100/H200), compiled there in
                    the background while the other checks run
    data/           the embedded synthetic data (`ensure_embedded_data`), so the smoke stage needs no
                    PyAV there (writing the synthetic videos does; the image has none)
    previous/       outputs of a previous visit (`--previous DIR`, kept across rebuilds): its Triton
                    cache and its causal-conv1d wheel, so the next visit starts warm and compiles nothing
    device_check.sh the check itself (tests/device/device_check.sh), manifest.json

Run from the repository root with the project's venv (it builds with the venv's torch and writes
the data with its PyAV): `python -m tests.device.build_kit [--out .devcheck] [--previous DIR]`. A
rebuild replaces the folder whole (a device run's default output, .devcheck/out, goes too), keeping
previous/.
Built and downloaded sources are cached in ~/.cache/hybrid-vl-sft/device-kit (`--no-cache` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
# The CPU install's locks: the kit takes their versions (mamba-ssm's is in the build lock).
LOCKS = (ROOT / "requirements-cpu.lock", ROOT / "requirements-cpu-build.lock")
MAX_KIT_MIB = 60
# The GPU image: CPython 3.12 on x86_64 Linux (glibc 2.28 or newer). pip matches manylinux tags
# exactly, so every level a wheel may carry is named.
PYTHON_VERSION = "3.12"
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
# Wheels PyPI has for the image as they are; their versions come from the lock.
BINARY = ["hydra-core", "omegaconf", "braceexpand", "webdataset", "megatron-core"]
# Only an sdist on PyPI, pure Python: a wheel is built here (hydra-core and omegaconf need it).
ANTLR = "antlr4-python3-runtime"
# The versions the kit was checked with, where no lock pins one (causal-conv1d: the `gpu` extra only).
MAMBA_SSM, CAUSAL_CONV1D = ("mamba-ssm", "2.3.2.post1"), ("causal-conv1d", "1.7.0")
# What causal-conv1d compiles for on the test machine (H100 and H200 are both sm_90).
CONV1D_ARCHS = "90"
# Where upstream's setup.py settles its arch flags: the kit's edit goes right before this line.
CONV1D_ARCH_ANCHOR = "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI is set to be the same as"
CONV1D_ARCH_EDIT = f'''\
    # hybrid-vl-sft device kit (tests/device/build_kit.py): compile for the GPU test machine only
    # (H100 / H200: sm_90) instead of the list above, so the build fits the machine's minutes.
    # CAUSAL_CONV1D_ARCHS="90,100" names others.
    if not HIP_BUILD:
        cc_flag = [flag for arch in os.getenv("CAUSAL_CONV1D_ARCHS", "{CONV1D_ARCHS}").split(",")
                   for flag in ("-gencode", f"arch=compute_{{arch}},code=sm_{{arch}}")]
'''
# What a previous visit leaves in its output folder that the next one reuses.
PREVIOUS_FILES = ("triton-cache.tar.gz", "causal_conv1d-*.whl")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hybrid-vl-sft" / "device-kit"


class KitError(RuntimeError):
    """A step of the build failed; the message says which and why."""


class Progress:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[device-kit {time.perf_counter() - self.start:5.1f}s] {message}", flush=True)


def lock_pins(locks: tuple[Path, ...] = LOCKS) -> dict[str, str]:
    """{normalised name: version} of every `name==version` line of the locks that exist."""
    pins = {}
    for lock in locks:
        for line in lock.read_text().splitlines() if lock.exists() else []:
            match = re.match(r"^([A-Za-z0-9._-]+)==([^ \\;]+)", line)
            if match:
                pins[normalise(match.group(1))] = match.group(2)
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(name: str, pins: dict[str, str], default: str | None = None) -> str:
    version = pins.get(normalise(name), default)
    if version is None:
        raise KitError(f"{LOCKS[0].name} pins no version of {name}: run `make lock`")
    return f"{name}=={version}"


def pip(args: list[str], what: str, env: dict | None = None) -> None:
    """`python -m pip ARGS` with the venv's pip; on failure the end of its output says why."""
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    result = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if result.returncode:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-25:])
        raise KitError(f"{what} failed (exit {result.returncode}): {' '.join(cmd)}\n{tail}")


def target_flags() -> list[str]:
    """pip options that pick CPython 3.12 x86_64 wheels, whatever python runs the build."""
    flags = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def download_binary_wheels(specs: list[str], dest: Path) -> None:
    pip(["download", "--no-deps", *target_flags(), "-d", str(dest), *specs], "downloading " + ", ".join(specs))


def cached(pattern: str, use_cache: bool) -> Path | None:
    hits = sorted(CACHE.glob(pattern)) if use_cache else []
    return hits[-1] if hits else None


def remember(path: Path, use_cache: bool) -> None:
    if use_cache and path.parent != CACHE:
        CACHE.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, CACHE / path.name)


def build_pure_wheel(spec: str, pattern: str, dest: Path, work: Path, use_cache: bool, env: dict | None = None,
                     isolated: bool = True) -> Path:
    """A py3-none-any wheel of `spec` built from its sdist (or the cache); fails if it is not pure."""
    wheel = cached(pattern, use_cache)
    if wheel is None:
        out = work / ("wheel-" + normalise(spec.split("==")[0]))
        out.mkdir()
        pip(["wheel", "--no-deps", "--no-binary", spec.split("==")[0], *([] if isolated else ["--no-build-isolation"]),
             "-w", str(out), spec], f"building a wheel of {spec}", env)
        wheel = next(out.glob("*.whl"))
    compiled = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith((".so", ".pyd"))]
    if not wheel.name.endswith("-py3-none-any.whl") or compiled:
        raise KitError(f"{wheel.name} is not a pure-Python wheel ({compiled[:3]}): the image's python could "
                       "not load a CPU build's extension")
    remember(wheel, use_cache)
    return Path(shutil.copy2(wheel, dest / wheel.name))


def fetch_sdist(spec: str, work: Path, use_cache: bool) -> Path:
    """The sdist of `spec` (pip prepares its metadata: a setup.py importing torch runs with the venv's)."""
    name, version = spec.split("==")
    sdist = cached(f"{name.replace('-', '_')}-{version}.tar.gz", use_cache)
    if sdist is None:
        out = work / "sdist"
        out.mkdir()
        # The skip flag keeps setup.py from looking for nvcc while pip reads its metadata.
        pip(["download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", str(out), spec],
            f"downloading the sdist of {spec}", {"CAUSAL_CONV1D_SKIP_CUDA_BUILD": "TRUE"})
        sdist = next(out.glob("*.tar.gz"))
    remember(sdist, use_cache)
    return sdist


def unpack_conv1d_source(sdist: Path, dest: Path) -> Path:
    """Unpack causal-conv1d's sdist under `dest` and restrict its arch flags (one marked edit of setup.py)."""
    with tarfile.open(sdist) as archive:
        archive.extractall(dest, filter="data")
    src = next(p for p in dest.iterdir() if p.is_dir() and p.name.startswith("causal_conv1d"))
    setup = src / "setup.py"
    text = setup.read_text()
    if text.count(CONV1D_ARCH_ANCHOR) != 1:
        raise KitError(f"{setup.name} of {src.name} no longer has the line the arch edit goes before "
                       f"({CONV1D_ARCH_ANCHOR.strip()!r}): read its arch flags and update CONV1D_ARCH_ANCHOR")
    setup.write_text(text.replace(CONV1D_ARCH_ANCHOR, CONV1D_ARCH_EDIT + CONV1D_ARCH_ANCHOR))
    shutil.rmtree(src / "causal_conv1d.egg-info", ignore_errors=True)  # stale metadata; the build writes its own
    return src


def write_data(dest: Path) -> dict:
    """The embedded synthetic data as the smoke recipes generate it (same arguments, so it is the same data)."""
    from data_pipelines.synth import ensure_embedded_data

    vocab_size = yaml.safe_load((ROOT / "configs" / "model" / "tiny.yaml").read_text())["language_model"]["vocab_size"]
    ensure_embedded_data(dest, seed=0, vocab_size=vocab_size)
    (dest.parent / f".{dest.name}.lock").unlink(missing_ok=True)
    return json.loads((dest / "COMPLETE").read_text())


def carry_previous(sources: list[Path], dest: Path, room: int, say: Progress) -> list[str]:
    """Copy a previous visit's reusable outputs into `dest` while they fit in `room` bytes: one of each
    kind, from the last of `sources` that has it. Returns what `dest` holds."""
    dest.mkdir(exist_ok=True)
    for source in sources:
        for pattern in PREVIOUS_FILES:
            for path in sorted(source.glob(pattern)):
                for old in dest.glob(pattern):
                    room += old.stat().st_size
                    old.unlink()
                if path.stat().st_size > room:
                    say(f"left out {path.name} ({mib(path.stat().st_size)}): the kit would exceed {MAX_KIT_MIB} MiB")
                    continue
                shutil.copy2(path, dest / path.name)
                room -= path.stat().st_size
    return sorted(p.name for p in dest.iterdir())


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def fill(staging: Path, use_cache: bool, say: Progress) -> dict:
    """Write the kit's wheels, source, data and script into `staging`; returns their manifest entries."""
    pins = lock_pins()
    work = staging / ".work"
    work.mkdir()
    wheels = staging / "wheels"
    wheels.mkdir()
    specs = [pinned(name, pins) for name in BINARY]
    say("downloading CPython 3.12 wheels: " + ", ".join(specs))
    download_binary_wheels(specs, wheels)
    spec = pinned(ANTLR, pins)
    say(f"building {spec} (an sdist only) into a wheel")
    build_pure_wheel(spec, f"antlr4_python3_runtime-{spec.split('==')[1]}-py3-none-any.whl", wheels, work, use_cache)
    spec = pinned(MAMBA_SSM[0], pins, MAMBA_SSM[1])
    say(f"building {spec} without its CUDA extension (pure Python; its Triton kernels compile on the GPU)")
    # --no-build-isolation: its setup.py imports torch even when it compiles nothing (the venv's serves).
    build_pure_wheel(spec, f"mamba_ssm-{spec.split('==')[1]}-py3-none-any.whl", wheels, work, use_cache,
                     env={"MAMBA_SKIP_CUDA_BUILD": "TRUE", "MAMBA_FORCE_BUILD": "TRUE"}, isolated=False)
    spec = pinned(CAUSAL_CONV1D[0], pins, CAUSAL_CONV1D[1])
    say(f"fetching {spec}'s source; its arch list becomes sm_{CONV1D_ARCHS}")
    src = unpack_conv1d_source(fetch_sdist(spec, work, use_cache), staging / "src")
    say("writing the embedded synthetic data")
    data = write_data(staging / "data")
    shutil.copy2(Path(__file__).with_name("device_check.sh"), staging / "device_check.sh")
    shutil.rmtree(work)
    return {"python": PYTHON_VERSION, "wheels": {p.name: p.stat().st_size for p in sorted(wheels.iterdir())},
            "causal_conv1d": {"source": f"src/{src.name}", "archs": CONV1D_ARCHS}, "data": data}


def build(out: Path, previous: list[Path], use_cache: bool, say: Progress) -> dict:
    """Build the kit in a staging folder beside `out`, then put it in `out`'s place (its previous/ kept)."""
    out = out.resolve()
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".staging-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would become the kit's
    try:
        manifest = {"built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fill(staging, use_cache, say)}
        kept = out / "previous"
        sources = ([kept] if kept.is_dir() else []) + [p.resolve() for p in previous]
        room = MAX_KIT_MIB * 2**20 - size_of(staging)
        manifest["previous"] = carry_previous(sources, staging / "previous", room, say) if sources else []
        if manifest["previous"]:
            say("carried from a previous visit: " + ", ".join(manifest["previous"]))
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        total = size_of(staging)
        if total > MAX_KIT_MIB * 2**20:
            biggest = sorted(staging.rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)[-3:]
            raise KitError(f"the kit is {mib(total)}, over {MAX_KIT_MIB} MiB; largest: "
                           + ", ".join(f"{p.relative_to(staging)} ({mib(p.stat().st_size)})" for p in biggest))
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        return {**manifest, "total_bytes": total}
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".devcheck", help="the kit's folder (default .devcheck)")
    parser.add_argument("--previous", type=Path, action="append", default=[], metavar="DIR",
                        help="a previous visit's output folder: its Triton cache and causal-conv1d wheel come along")
    parser.add_argument("--no-cache", action="store_true", help=f"rebuild and refetch everything (cache: {CACHE})")
    args = parser.parse_args(argv)
    say = Progress()
    try:
        manifest = build(args.out, args.previous, not args.no_cache, say)
    except KitError as err:
        print(f"device-kit: {err}", file=sys.stderr)
        return 1
    for name, size in manifest["wheels"].items():
        say(f"  wheels/{name}  {mib(size)}")
    say(f"kit ready: {args.out} ({mib(manifest['total_bytes'])} of at most {MAX_KIT_MIB} MiB). On the GPU machine: "
        f"bash {args.out.name}/device_check.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
