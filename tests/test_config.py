"""The configuration contract: names, defaults from the seed, and one clear line for every bad value."""
import dataclasses

import pytest

from conftest import ROOT, job_env, run_job
from job.config import FIELDS, Config, ConfigError, env_example, from_env, setting


def test_defaults_are_the_seed_recipe():
    c = Config()
    assert (c.base_model, c.dataset, c.num_samples) == ("NousResearch/Llama-2-7b-chat-hf", "Cynaptics/persona-chat", 1000)
    assert (c.lora_r, c.lora_alpha, c.lora_dropout, c.target_modules) == (64, 16, 0.1, ["q_proj", "v_proj"])
    assert (c.per_device_train_batch_size, c.learning_rate, c.lr_scheduler_type, c.optim) == \
        (4, 2e-4, "cosine", "paged_adamw_32bit")
    assert (c.gradient_accumulation_steps, c.num_train_epochs, c.max_steps, c.seed) == (1, 1, -1, 42)
    assert (c.save_steps, c.save_total_limit, c.logging_steps) == (50, 3, 10)
    assert (c.checkpoint_uri, c.output_dir, c.hub_model_id, c.hub_private_repo, c.hub_revision) == \
        ("./checkpoints", "./output", "", True, "main")
    assert c.require_gpu is True


def test_contract_variable_names_exist():
    contract = """BASE_MODEL DATASET NUM_SAMPLES SEED MAX_SEQ_LENGTH LORA_R LORA_ALPHA LORA_DROPOUT
    LORA_TARGET_MODULES PER_DEVICE_TRAIN_BATCH_SIZE GRADIENT_ACCUMULATION_STEPS LEARNING_RATE LR_SCHEDULER_TYPE
    OPTIM NUM_TRAIN_EPOCHS MAX_STEPS SAVE_STEPS SAVE_TOTAL_LIMIT LOGGING_STEPS RUN_ID CHECKPOINT_URI OUTPUT_DIR
    HUB_MODEL_ID HUB_PRIVATE_REPO HUB_REVISION REQUIRE_GPU HF_TOKEN""".split()
    assert set(contract) <= set(FIELDS)


def test_env_example_is_generated_from_the_config():
    on_disk = (ROOT / ".env.example").read_text()
    assert on_disk == env_example(), "regenerate with: python -m job env-example > .env.example"
    for name in FIELDS:
        assert f"\n{name}=" in on_disk


def test_config_is_frozen_and_typed():
    c = from_env({"LORA_R": "16", "LEARNING_RATE": "1e-3", "HUB_PRIVATE_REPO": "false", "NUM_TRAIN_EPOCHS": "2"})
    assert (c.lora_r, c.learning_rate, c.hub_private_repo, c.num_train_epochs) == (16, 1e-3, False, 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lora_r = 8


@pytest.mark.parametrize("name,value,expect", [
    ("LORA_R", "abc", "LORA_R='abc': must be a whole number"),
    ("LORA_R", "0", "LORA_R='0': must be >= 1"),
    ("LEARNING_RATE", "-1", "LEARNING_RATE='-1': must be a positive number"),
    ("LEARNING_RATE", "nan", "LEARNING_RATE='nan': must be a finite number"),
    ("LR_SCHEDULER_TYPE", "cosin", "LR_SCHEDULER_TYPE='cosin': must be one of: linear, cosine"),
    ("OPTIM", "adam", "OPTIM='adam': must be one of:"),
    ("LORA_DROPOUT", "1.5", "LORA_DROPOUT='1.5': must be >= 0 and < 1"),
    ("REQUIRE_GPU", "maybe", "REQUIRE_GPU='maybe': must be true or false"),
    ("MAX_STEPS", "0", "MAX_STEPS='0': must be -1"),
    ("LORA_TARGET_MODULES", "q_proj;v_proj", "must be a comma list of module names"),
    ("RUN_ID", "My Run", "RUN_ID='My Run': must be empty (derived) or"),
    ("HUB_MODEL_ID", "no-slash", "HUB_MODEL_ID='no-slash': must be empty (no push) or 'user/name'"),
    ("LEARNING_RTE", "1e-4", "LEARNING_RTE is not a setting of this job (did you mean LEARNING_RATE?)"),
    ("LORA_RANK", "8", "LORA_RANK is not a setting of this job (did you mean LORA_R?)"),
    # A ConfigMap block scalar (`RUN_ID: |`) ends the value with a newline; store keys must never hold one.
    ("RUN_ID", "myrun\n", "RUN_ID='myrun\\n': must be empty (derived) or"),
    ("HUB_MODEL_ID", "me/adapter\n", "HUB_MODEL_ID='me/adapter\\n': must be empty (no push) or 'user/name'"),
    ("HUB_REVISION", "", "HUB_REVISION='': must be a git branch name"),
    ("HUB_MERGED_REVISION", "bad..name", "HUB_MERGED_REVISION='bad..name': must be a git branch name"),
    ("MASTER_PORT", "99999", "MASTER_PORT='99999': must be a TCP port, 1-65535"),
    ("OUTPUT_DIR", "", "OUTPUT_DIR='': must be a directory path"),
    ("BASE_MODEL_ID", "/models/llama", "BASE_MODEL_ID='/models/llama': must be empty or a Hub model id"),
])
def test_bad_value_stops_train_with_one_line_and_exit_2_before_loading(tmp_path, name, value, expect):
    # BASE_MODEL points nowhere: had the job got as far as loading, it would fail differently.
    env = job_env(**{"BASE_MODEL": str(tmp_path / "no-model"), "REQUIRE_GPU": "false",
                     "CHECKPOINT_URI": str(tmp_path / "store"), "OUTPUT_DIR": str(tmp_path / "out"), name: value})
    result = run_job("train", env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "store").exists(), "nothing may be written before the config is valid"


def test_a_node_rank_outside_the_nodes_stops_train_with_one_line(tmp_path):
    env = job_env(BASE_MODEL=str(tmp_path / "no-model"), REQUIRE_GPU="false", NNODES="2", NODE_RANK="2",
                  CHECKPOINT_URI=str(tmp_path / "store"), OUTPUT_DIR=str(tmp_path / "out"))
    result = run_job("train", env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: NODE_RANK=2: must be below NNODES=2 (nodes are numbered 0..NNODES-1)"]


def test_liger_and_torch_compile_both_forced_on_is_refused_in_one_line():
    # Measured on an H200: dynamo's trace of Liger's RMSNorm fails at the first step, after the model load.
    with pytest.raises(ConfigError) as caught:
        from_env({"USE_LIGER_KERNEL": "true", "TORCH_COMPILE": "true"})
    assert caught.value.problems == [
        "USE_LIGER_KERNEL=true with TORCH_COMPILE=true: torch.compile cannot trace Liger's kernels; set "
        "USE_LIGER_KERNEL=auto (compiled layers get inductor's own fusions) or TORCH_COMPILE=false"]
    assert from_env({"USE_LIGER_KERNEL": "true", "TORCH_COMPILE": "auto"}).torch_compile == "auto"


@pytest.mark.parametrize("name", ["main", "merged", "feature/x", "v1.0", "release-2026_11", "a@b"])
def test_branch_names_git_accepts_are_accepted(name):
    import subprocess
    assert subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True).returncode == 0
    assert from_env({"HUB_REVISION": name}).hub_revision == name


@pytest.mark.parametrize("name", ["", "bad..name", "a b", "x~1", "a^", "a:b", "what?", "a*", "a[b", "a\\b", "-x",
                                  "x/", "/x", "x.lock", "x.", "a//b", "a/.b", "a@{b", "tab\there"])
def test_branch_names_git_refuses_are_refused(name):
    import subprocess
    assert subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True).returncode != 0
    with pytest.raises(ConfigError):
        from_env({"HUB_MERGED_REVISION": name})


def test_a_token_with_a_trailing_newline_is_stripped():
    # `echo hf_... | kubectl create secret` stores the newline; sent as is, the HTTP client's error would quote it.
    assert from_env({"HF_TOKEN": "hf_abcdef\n"}).hf_token == "hf_abcdef"


def test_base_model_id_takes_hub_ids_only():
    assert from_env({"BASE_MODEL_ID": "NousResearch/Llama-2-7b-chat-hf"}).base_model_id == \
        "NousResearch/Llama-2-7b-chat-hf"
    assert from_env({"BASE_MODEL_ID": "gpt2"}).base_model_id == "gpt2"
    for bad in ("./models/x", "a/b/c", "x--y", "name.git"):
        with pytest.raises(ConfigError):
            from_env({"BASE_MODEL_ID": bad})


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        from_env({"LORA_R": "x", "SEED": "y", "SAVE_STEPS": "-3"})
    assert [p.split("=")[0] for p in err.value.problems] == ["SEED", "LORA_R", "SAVE_STEPS"]


def test_unrelated_environment_is_not_mistaken_for_a_typo():
    common = ["LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
              "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "HF_DATASETS_CACHE", "KUBERNETES_SERVICE_HOST",
              "KUBERNETES_PORT_443_TCP", "PYTHON_VERSION", "PYTHONUNBUFFERED", "LD_LIBRARY_PATH", "NCCL_DEBUG",
              "TORCH_CUDA_ARCH_LIST", "PIP_NO_CACHE_DIR", "NV_CUDA_LIB_VERSION", "AWS_PROFILE", "AWS_CA_BUNDLE",
              "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "NPROC_PER_NODE", "HOSTNAME", "RANK", "GROUP_RANK"]
    from_env({name: "1" for name in common})


def test_config_command_redacts_the_token(tmp_path):
    secret = "hf_ThisIsASecretTokenValue123"
    result = run_job("config", env=job_env(HF_TOKEN=secret, LORA_R="16"))
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    assert '"HF_TOKEN": "***"' in result.stdout and '"LORA_R": 16' in result.stdout


def test_run_id_follows_the_settings_that_change_the_result():
    base = from_env({})
    assert base.resolved_run_id.startswith("llama-2-7b-chat-hf-")
    assert from_env({"LORA_R": "8"}).resolved_run_id != base.resolved_run_id
    assert from_env({"SAVE_STEPS": "5", "LOGGING_STEPS": "1", "HF_TOKEN": "x"}).resolved_run_id == base.resolved_run_id
    assert from_env({"RUN_ID": "my-run"}).resolved_run_id == "my-run"


def test_a_setting_added_later_leaves_the_runs_before_it_alone_while_at_its_default():
    # Runs started before the setting existed keep their fingerprint (so their RUN_ID and run.json) and resume.
    later = dataclasses.make_dataclass(
        "Later", [("new_knob", int, setting(0, "a setting added later", left_out_at_default=True))],
        bases=(Config,), frozen=True)
    assert later().fingerprint() == Config().fingerprint() and "NEW_KNOB" not in later().result_settings()
    assert later(new_knob=1).fingerprint() != Config().fingerprint()
    assert later(new_knob=1).result_settings()["NEW_KNOB"] == 1


@pytest.mark.parametrize("uri, says", [
    ("s3:/bucket/x", "is not a valid S3 URI; did you mean s3://bucket/x?"),
    ("s3//bucket", "is not a valid S3 URI; did you mean s3://bucket?"),
    ("bucket/prefix", "is neither an S3 URI nor an explicit local path; for S3 write s3://bucket/prefix, for a "
                      "local directory ./bucket/prefix"),
    ("S3://bucket/x", "did you mean s3://bucket/x?"),
    ("gs://bucket/x", "S3-interoperable API: set CHECKPOINT_URI=s3://bucket/prefix, "
                      "AWS_ENDPOINT_URL_S3=https://storage.googleapis.com"),
    ("s3://trainer:pw-SECRET-42@bucket/x", "CHECKPOINT_URI='s3://***@bucket/x': holds credentials"),
    ("file://relative/x", "a file:// URI needs an absolute path"),
])
def test_a_malformed_checkpoint_uri_stops_train_with_one_line_and_exit_2_before_loading(tmp_path, uri, says):
    # Each of these used to open a folder inside the container (lost with it) or echo the password.
    env = job_env(BASE_MODEL=str(tmp_path / "no-model"), REQUIRE_GPU="false", CHECKPOINT_URI=uri,
                  OUTPUT_DIR=str(tmp_path / "out"))
    before = set(ROOT.iterdir())
    result = run_job("train", env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: CHECKPOINT_URI=") and says in lines[0], lines
    assert "pw-SECRET-42" not in result.stdout + result.stderr and "trainer" not in lines[0]
    assert set(ROOT.iterdir()) == before, "no local folder may be made of a mistyped URI"


@pytest.mark.parametrize("uri", ["s3://bucket", "s3://bucket/runs/", "/abs/path", "./checkpoints", "../up",
                                 "file:///abs/path", "~/checkpoints"])
def test_the_accepted_checkpoint_uris(uri):
    assert from_env({"CHECKPOINT_URI": uri}).checkpoint_uri == uri


def test_the_names_accepted_without_importing_transformers_are_transformers_own():
    """OPTIM and LR_SCHEDULER_TYPE: the common names pass the config check without importing transformers for its
    lists (a command failing on another setting says so in a tenth of a second, not six); each is a name
    transformers itself accepts, and any other name is still checked against transformers' list."""
    from job.config import _optimizer_names, _scheduler_names

    import subprocess
    import sys

    for names in (_optimizer_names, _scheduler_names):
        assert names.common and set(names.common) <= set(names())
    checked = subprocess.run([sys.executable, "-c", "import sys; from job.config import from_env; "
                              "from_env({'OPTIM': 'paged_adamw_32bit', 'LR_SCHEDULER_TYPE': 'cosine'}); "
                              "print('transformers' in sys.modules)"], cwd=ROOT, capture_output=True, text=True)
    assert checked.stdout.strip() == "False", checked.stderr
    assert from_env({"OPTIM": "adamw_torch_xla"}).optim == "adamw_torch_xla"     # not common: transformers' list
    with pytest.raises(ConfigError, match="OPTIM='adamw_torh': must be one of: .*did you mean adamw_torch"):
        from_env({"OPTIM": "adamw_torh"})
