"""`make device-kit`'s kit, checked on CPU: built (downloads from PyPI, or the builder's cache), at most
60 MiB, installable with `pip install --no-index --no-deps --target`, and enough, with the GPU image's
own packages, for everything the device check's steps import; `device_check.sh --dry-run` lists the
steps within 9 minutes. The image is simulated with this venv: a python with no site whose path holds
only the image's distributions, the kit's install folder and the repository (tests/device/image_env.py).

The build takes ~35 s from a cold cache (then ~3 s each; the fixture builds once, the carry-over test
twice); the import check (marked slow) starts one python for every step's imports (~35 s here).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.device import build_kit, summarize
from tests.device.image_env import ABSENT, image_python, image_view

ROOT = Path(__file__).resolve().parents[2]
GPU_TEST_FILES = ["tests/gpu/test_kernel_parity.py", "tests/gpu/test_model_gpu.py", "tests/gpu/test_mcore_gpu.py",
                  "tests/gpu/test_fp8_scaled_mm.py"]
NINE_MINUTES = 540

# Run by the image's (simulated) python: what steps a (env_report), b/c/e/f (their test modules,
# collected), d (the stage's modules and its config on the kit's data) and g (the bench) import.
IMAGE_CHECK = """
import importlib, importlib.util, json, sys
from pathlib import Path
kit, site = Path(sys.argv[1]), sys.argv[2]
hidden = [m for m in {hidden!r} if importlib.util.find_spec(m) is not None]
assert not hidden, f"the simulated image sees {{hidden}}"
import hydra, megatron.core
assert hydra.__file__.startswith(site) and megatron.core.__file__.startswith(site), "the kit's copies must be used"

from tests.device import env_report
assert env_report.main([]) == 0, "env_report found a kit package that does not import"

# step d: the stage's modules, and its config on the kit's data (validated: every path exists)
import train.loop.trainer
from tests.device.smoke_resume import RECIPE, data_overrides
from train.config.compose import load_config
cfg = load_config(RECIPE, ["smoke=gpu", *data_overrides(kit / "data", "gpu")])
assert cfg.data.synth_dir is None and cfg.trainer.device == "cuda" and len(cfg.data.sources) == 3

# step e (the megatron modules its test imports inside its fixture) and step g
import train.engines.mcore.model, train.engines.mcore.weights, train.engines.mcore.loss
import tests.bench.gpu_layers
from train.plan.estimate import load_plan_config
load_plan_config("stage1_image_sft", ["parallel=single"])

# steps b, c, e, f: their test modules collect (imports, fixtures, parametrisation)
import pytest
assert pytest.main(["--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", *{files!r}]) == 0
absent = sorted(m for m in {absent_modules!r} if m in sys.modules)
assert not absent, absent
print("IMAGE-CHECK-OK")
"""
ABSENT_MODULES = ["av", "decord", "wandb", "datasets", "lm_eval", "flash_attn", "transformer_engine", "causal_conv1d"]
PREVIOUS = ["causal_conv1d-1.7.0-cp312-cp312-linux_x86_64.whl", "triton-cache.tar.gz"]


def build(out: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "tests.device.build_kit", "--out", str(out), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    """The kit, built with a previous visit's returned folder (its reusable files come along)."""
    returned = tmp_path_factory.mktemp("returned")
    (returned / PREVIOUS[0]).write_bytes(b"PK a wheel")
    (returned / PREVIOUS[1]).write_bytes(b"\x1f\x8b a cache")
    (returned / "summary.json").write_text("{}")  # not reusable: stays behind
    out = tmp_path_factory.mktemp("repo") / ".devcheck"
    result = build(out, "--previous", str(returned))
    assert re.search(r"kit ready: .* \(\d+\.\d MiB of at most 60 MiB\)", result.stdout)
    return out


def test_kit_holds_the_wheels_source_and_data_within_60_mib(kit):
    total = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    assert total <= 60 * 2**20
    manifest = json.loads((kit / "manifest.json").read_text())
    wheels = sorted(p.name for p in (kit / "wheels").glob("*.whl"))
    assert wheels == sorted(manifest["wheels"])
    names = {build_kit.normalise(w.split("-")[0]) for w in wheels}
    assert names == {"hydra-core", "omegaconf", "antlr4-python3-runtime", "braceexpand", "webdataset",
                     "megatron-core", "mamba-ssm"}
    pins = build_kit.lock_pins()
    for wheel in wheels:  # the lock's versions where it pins one
        name, version = wheel.split("-")[:2]
        assert pins.get(build_kit.normalise(name), version) == version, wheel
    megatron = next(w for w in wheels if w.startswith("megatron_core"))
    assert "-cp312-cp312-" in megatron and "x86_64" in megatron
    mamba = next(kit.glob("wheels/mamba_ssm-*-py3-none-any.whl"))  # built without its CUDA extension
    assert not [n for n in zipfile.ZipFile(mamba).namelist() if n.endswith(".so")]

    setup = next(kit.glob("src/causal_conv1d-*/setup.py")).read_text()
    assert setup.count("hybrid-vl-sft device kit") == 1
    assert setup.index(build_kit.CONV1D_ARCH_EDIT) < setup.index(build_kit.CONV1D_ARCH_ANCHOR)
    compile(setup, "setup.py", "exec")
    assert (kit / "device_check.sh").read_text() == (ROOT / "tests/device/device_check.sh").read_text()
    complete = json.loads((kit / "data" / "COMPLETE").read_text())
    assert complete == manifest["data"] and complete["vocab_size"] == 1024 and (kit / "data/tokenizer").is_dir()


@pytest.mark.slow  # ~35 s here: megatron-core alone takes ~15 s to import
def test_kit_installs_and_the_steps_import_with_only_the_image_packages(kit, tmp_path):
    site = tmp_path / "site"
    wheels = sorted(str(p) for p in (kit / "wheels").glob("*.whl"))
    # As device_check.sh installs them; the target flags accept the CPython 3.12 wheels on this python.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                    "--no-deps", "--no-compile", "--target", str(site), *build_kit.target_flags(), *wheels],
                   check=True, timeout=300)
    view = image_view(tmp_path / "image-site-packages")
    assert (view / "torch").exists() and not (view / "hydra").exists() and not (view / "av").exists()
    program = IMAGE_CHECK.format(hidden=ABSENT_MODULES, files=GPU_TEST_FILES,
                                 absent_modules=ABSENT_MODULES)
    cmd, env = image_python(view, site, "-c", program, str(kit), str(site))
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "IMAGE-CHECK-OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    assert "kit_import_errors\": []" in result.stdout


def test_previous_visit_outputs_come_along_and_stay_across_rebuilds(kit, tmp_path):
    """--previous DIR: a visit's Triton cache and causal-conv1d wheel go into previous/ (what
    device_check.sh restores and installs instead of compiling); a rebuild without it keeps them."""
    copy = tmp_path / ".devcheck"
    shutil.copytree(kit, copy)
    build(copy)  # a rebuild, without --previous
    for out in (kit, copy):
        assert sorted(p.name for p in (out / "previous").iterdir()) == PREVIOUS
        assert json.loads((out / "manifest.json").read_text())["previous"] == PREVIOUS
    assert not list(tmp_path.glob(".devcheck.staging-*"))  # no staging folder left behind


def test_absent_packages_stay_out_of_the_simulated_image():
    from tests.device.image_env import image_distributions

    chosen = set(image_distributions())
    assert {"torch", "transformers", "pytest", "numpy"} <= chosen
    assert not chosen & {build_kit.normalise(n) for n in ABSENT}


def test_dry_run_lists_the_steps_within_nine_minutes(kit):
    result = subprocess.run(["bash", str(kit / "device_check.sh"), "--dry-run"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    rows = dict(re.findall(r"^(\w+)\s+(\d+) s  ", result.stdout, re.M))
    budgets = {name: int(seconds) for name, seconds in rows.items()}
    assert list(budgets) == ["install", "a", "b", "c", "d", "e", "f", "g", "h", "build", "total"]
    before_h = sum(budgets[s] for s in ["install", "a", "b", "c", "d", "e", "f", "g"])
    # Step h waits for the build, which starts after the install; the total is the script's bound.
    assert budgets["total"] == max(before_h, budgets["install"] + budgets["build"]) + budgets["h"]
    assert budgets["total"] <= NINE_MINUTES
    assert all(seconds > 0 for seconds in budgets.values())
    assert not (kit / "out").exists()  # a dry run writes nothing


def test_device_check_script_passes_shellcheck():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(shellcheck) if shellcheck.exists() else shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run([shellcheck, "tests/device/device_check.sh"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_summary_reads_each_steps_status_figures_and_tail(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "out"
    logs.mkdir()
    out.mkdir()
    (logs / "b.log").write_text("collected\n..F\nFAILED x\n1 failed, 12 passed, 3 deselected in 40.1s\n")
    (logs / "d.log").write_text('step 1\nDEVCHECK {"losses": [6.9, 6.5], "failures": []}\n')
    (logs / "g.log").write_text("killed\n")
    records = tmp_path / "steps.tsv"
    records.write_text("b\tfail\t1\t41.0\t120\tkernel parity\n"
                       "d\tpass\t0\t60.5\t100\tsmoke\n"
                       "g\tfail\t124\t80.0\t80\tbench\n")
    assert summarize.main(["--records", str(records), "--logs", str(logs), "--kit", str(tmp_path), "--out", str(out),
                           "--started", "0"]) == 0
    result = json.loads((out / "summary.json").read_text())
    assert result["status"] == "fail"
    steps = result["steps"]
    assert steps["b"]["figures"]["pytest"] == {"failed": 1, "passed": 12, "deselected": 3}
    assert steps["b"]["tail"][-1].startswith("1 failed") and steps["b"]["budget_s"] == 120
    assert steps["d"]["status"] == "pass" and steps["d"]["figures"] == {"losses": [6.9, 6.5], "failures": []}
    assert steps["g"]["timed_out"] and not steps["b"]["timed_out"]
    assert result["device_check"]["output"] == ["summary.json"]
