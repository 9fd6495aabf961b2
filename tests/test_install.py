"""What the core install (`pip install volo-jax`, no extras) runs on: its entry points import
no TensorFlow, PyTorch or other extra; a command that needs an extra names it; the console
scripts; the Colab install's requirements; `pip install -r requirements.txt`."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from tests.support import REPO, run_python
from volo_jax.extras import EXTRA_MODULES

NAME = "volo_d1_224"

#: Modules of the extras that the core's own dependencies bring too (flax needs optax, which
#: needs absl-py).
CORE_BRINGS = {"absl", "optax"}
#: Top-level modules that only the extras bring (the core must not import them).
EXTRA_ONLY = sorted(
    {module for modules in EXTRA_MODULES.values() for module, _ in modules} - CORE_BRINGS
)
#: The core's modules: every command and library entry point of `pip install volo-jax`.
CORE_MODULES = (
    "volo_jax",
    "volo_jax.cli",
    "volo_jax.convert",
    "volo_jax.convert.__main__",
    "volo_jax.data",
    "volo_jax.data.score_maps",
    "volo_jax.data.transforms",
    "volo_jax.errors",
    "volo_jax.extras",
    "volo_jax.logs",
    "volo_jax.models",
    "volo_jax.ops",
    "volo_jax.platforms.cpu",
    "volo_jax.paths",
    "volo_jax.predict",
    "volo_jax.progress",
    "volo_jax.sharding",
    "volo_jax.weights",
)

#: Run in a child process: the modules of `block` cannot be imported (as in an install
#: without them), and at exit it prints the extras' modules that were imported.
_PRELUDE = """
import atexit, importlib.abc, sys
BLOCK = {block!r}
EXTRA_ONLY = {extra_only!r}

class _NotInstalled(importlib.abc.MetaPathFinder):
    # Finding a blocked module fails as if it were not installed (and, unlike a None in
    # sys.modules, libraries that look for it there do not see it).
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())

def _audit():
    seen = sorted(m for m in sys.modules if m.split(".")[0] in EXTRA_ONLY and sys.modules[m])
    print("IMPORTED", seen, flush=True)

atexit.register(_audit)
"""


def run_core(code: str, block: tuple[str, ...] = (), **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh process where importing a module of `block` fails (an extra not
    installed); at exit it prints the extras' modules that were imported."""
    prelude = _PRELUDE.format(block=block, extra_only=EXTRA_ONLY)
    return run_python("-c", prelude + code, env={"JAX_PLATFORMS": "cpu", **env}, timeout=300)


def imported_extras(done: subprocess.CompletedProcess) -> list[str]:
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("IMPORTED ")]
    return eval(line.removeprefix("IMPORTED "))  # a list literal printed by _audit


def test_core_entry_points_import_no_extra():
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in CORE_MODULES)
    done = run_core(code)
    assert done.returncode == 0, done.stderr
    # tensorflow, tensorflow_datasets, torch, sklearn, matplotlib, gcsfs, absl, optax, ...
    assert imported_extras(done) == []


def test_the_audit_sees_an_extra_imported():
    # The check above can fail: the training code imports extras (ml_collections here).
    done = run_core("import volo_jax.training.config")
    assert done.returncode == 0, done.stderr
    assert "ml_collections" in imported_extras(done)


def test_convert_and_predict_run_without_the_extras(tmp_path):
    """The core's whole path, with every extra's module blocked: a timm-layout .safetensors
    file -> volo-jax-convert -> one .safetensors file -> volo-jax-predict on an image."""
    from PIL import Image
    from safetensors.numpy import save_file

    from tests.support import timm_pairs
    from tests.test_weights import random_variables
    from volo_jax.convert.mapping import flax_to_torch

    overrides = {**timm_pairs.shrunk_overrides(NAME, factor=8), "num_classes": 1000, "img_size": 64}
    model = timm_pairs.jax_volo(NAME, **overrides)
    src = tmp_path / "model.safetensors"
    save_file(flax_to_torch(random_variables(model)), src)  # timm's names and layouts
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8)).save(image)
    dst = tmp_path / "out" / "volo_d1_224.safetensors"
    code = f"""
import runpy
from volo_jax.convert import convert_checkpoint
convert_checkpoint({NAME!r}, {str(src)!r}, {str(dst)!r}, **{overrides!r})
sys.argv = ["volo-jax-predict", "--weights", {str(dst)!r}, {str(image)!r}]
try:
    runpy.run_module("volo_jax.predict", run_name="__main__")
except SystemExit as exit:
    assert not exit.code, exit.code
"""
    done = run_core(code, block=tuple(EXTRA_ONLY))
    assert done.returncode == 0, done.stderr
    assert imported_extras(done) == []
    from volo_jax.data import imagenet_class_names

    lines = done.stdout.splitlines()
    assert lines[0] == str(image), done.stdout
    names = set(imagenet_class_names())  # stored in the file by convert
    for line in lines[1:6]:
        percent, label = line.split(maxsplit=1)
        assert percent.endswith("%") and label in names, done.stdout


def test_reading_a_pth_tar_or_a_gs_path_without_its_extra_names_it(tmp_path):
    src = tmp_path / "d1_224_84.2.pth.tar"
    src.write_bytes(b"not read")
    code = (
        "from volo_jax.convert import read_state_dict\n"
        "from volo_jax.extras import MissingExtraError\n"
        "from volo_jax.weights import read_metadata\n"
        f"for call in (lambda: read_state_dict({str(src)!r}),\n"
        "             lambda: read_metadata('gs://bucket/w.safetensors')):\n"
        "    try:\n"
        "        call()\n"
        "    except MissingExtraError as err:\n"
        "        print('error:', err)\n"
    )
    done = run_core(code, block=("torch", "gcsfs"))
    assert done.returncode == 0, done.stderr
    pth, gs = [ln for ln in done.stdout.splitlines() if ln.startswith("error: ")]
    assert pth.startswith(
        "error: reading d1_224_84.2.pth.tar needs PyTorch: pip install 'volo-jax[torch]'"
    ), pth
    assert "gs://bucket/w.safetensors needs gcsfs" in gs, gs
    assert "pip install 'volo-jax[gcs]'" in gs, gs


def test_main_py_without_the_train_extra_names_it():
    code = (
        "import runpy\n"
        "sys.argv = ['main.py', '--config=configs/default.py', '--workdir=/tmp/unused']\n"
        "runpy.run_path('main.py', run_name='__main__')\n"
    )
    done = run_core(code, block=("tensorflow", "tensorflow_datasets"))
    assert done.returncode == 1, done.stderr
    assert "training and evaluation (main.py) needs tensorflow-cpu, tensorflow-datasets" in (
        done.stderr
    )
    assert "pip install 'volo-jax[train]'" in done.stderr and "Traceback" not in done.stderr


def _pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def test_console_scripts_point_at_the_module_commands():
    scripts = _pyproject()["scripts"]
    assert scripts == {
        "volo-jax-convert": "volo_jax.convert.__main__:run",
        "volo-jax-predict": "volo_jax.predict:run",
    }
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_console_script_usage_names_the_command(tmp_path):
    # A console script's argv[0] is its own name; `python -m` runs a .py file.
    code = (
        "sys.argv = ['/venv/bin/volo-jax-convert', '--help']\n"
        "from volo_jax.convert.__main__ import run\n"
        "run()\n"
    )
    done = run_core(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: volo-jax-convert [-h] --model MODEL"), done.stdout
    done = run_python("-m", "volo_jax.predict", "--help", check=True)
    assert done.stdout.startswith("usage: python -m volo_jax.predict [-h]"), done.stdout


def test_core_dependencies_leave_the_extras_out():
    core = " ".join(_pyproject()["dependencies"]).lower()
    for dist in ("tensorflow", "torch", "gcsfs", "scikit-learn", "matplotlib", "chex", "optax"):
        assert dist not in core, dist


def _runtime_requirements():
    spec = importlib.util.spec_from_file_location(
        "runtime_requirements", REPO / "scripts" / "runtime_requirements.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.runtime_requirements


def test_colab_install_keeps_the_runtimes_tensorflow():
    requirements = _runtime_requirements()
    train = _pyproject()["optional-dependencies"]["train"]
    bare = requirements(["train"], has_module=lambda m: False)
    assert bare == train and any(r.startswith("tensorflow-cpu") for r in bare)
    colab_tpu = requirements(["train"], has_module=lambda m: m in ("tensorflow", "libtpu"))
    assert not any(r.startswith("tensorflow-cpu") for r in colab_tpu)
    assert colab_tpu[-1] == "jax[tpu]" and len(colab_tpu) == len(train)
    with pytest.raises(SystemExit, match="unknown extra 'trian'"):
        requirements(["trian"])


def test_the_extras_named_in_errors_are_those_of_pyproject():
    import re

    optional = _pyproject()["optional-dependencies"]
    for extra, modules in EXTRA_MODULES.items():
        declared = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in optional[extra]}
        for _, dist in modules:
            assert dist.lower() in declared, (extra, dist)


def _pin(name: str) -> str:
    """`name`'s version in constraints.txt."""
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower().replace("_", "-") == name:
            return line.split("==")[1].strip()
    raise AssertionError(f"{name} is not pinned in constraints.txt")


def test_requirements_txt_is_the_train_extra_at_the_tested_versions(tmp_path):
    # Resolved in the suite's environment (installed from constraints.txt): pip would add
    # this checkout with the train extra and nothing else, every other package already
    # being there at its tested version.
    report = tmp_path / "report.json"
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "-q"]
    done = subprocess.run(
        [*pip, "--report", str(report), "-r", "requirements.txt"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (install,) = json.loads(report.read_text())["install"]
    assert install["metadata"]["name"] == "volo-jax", install["metadata"]
    assert install["requested_extras"] == ["train"], install
    assert install["download_info"]["dir_info"] == {"editable": True}, install


@pytest.mark.slow
def test_requirements_txt_makes_a_venv_that_trains(tmp_path):
    # What a user types, in a new virtual environment: ~2 min of pip with a warm cache.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    def run(*argv: str, timeout: float) -> str:
        done = subprocess.run(
            argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, (argv, done.stdout[-3000:], done.stderr[-5000:])
        return done.stdout + done.stderr

    run(python, "-m", "pip", "install", "-q", "-r", "requirements.txt", timeout=1800)
    installed = json.loads(run(python, "-m", "pip", "list", "--format=json", timeout=120))
    versions = {p["name"].lower().replace("_", "-"): p["version"] for p in installed}
    for name in (
        "jax",
        "flax",
        "optax",
        "tensorflow-cpu",
        "tensorflow-datasets",
        "orbax-checkpoint",
    ):
        assert versions.get(name) == _pin(name), (name, versions.get(name))
    workdir = tmp_path / "run"
    text = run(
        python,
        "main.py",
        "--config=configs/smoke.py",
        f"--workdir={workdir}",
        "--config.max_steps=4",
        "--config.log_every_steps=2",
        timeout=900,
    )
    assert "step 4/4 done in " in text, text[-3000:]
    assert (workdir / "weights").exists(), text[-3000:]
