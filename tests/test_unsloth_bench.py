"""bench/unsloth_bench.py measures Unsloth or nothing: its process gets Unsloth's own site directory and settings,
and a model without Unsloth's fast path fails the configuration instead of being timed under Unsloth's name.
(Unsloth itself runs on a GPU: `python bench/unsloth_bench.py --cpu-check` checks its plumbing on a CPU.)"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import unsloth_bench  # noqa: E402
from unsloth_bench import UnslothUnavailable, child_environment, fast_path, import_unsloth  # noqa: E402


def test_an_unsloth_configuration_runs_on_its_own_site_directory_without_the_jobs(tmp_path):
    site = tmp_path / "site-unsloth"
    (site / "unsloth").mkdir(parents=True)
    (site / "unsloth" / "__init__.py").write_text("")
    env = child_environment({"PYTHONPATH": "/tmp/site:/opt/other", "UNSLOTH_SITE": str(site), "PATH": "/bin"})
    assert env["PYTHONPATH"].split(":") == [str(site), "/opt/other"]
    assert env["UNSLOTH_DISABLE_STATISTICS"] == "1" and env["HF_HUB_OFFLINE"] == "1"


def test_without_unsloths_wheels_installed_the_configuration_says_what_to_do(tmp_path):
    with pytest.raises(UnslothUnavailable, match="fetch_unsloth_wheels"):
        child_environment({"UNSLOTH_SITE": str(tmp_path / "missing")})


def test_unsloth_must_be_imported_first_and_with_its_settings(monkeypatch):
    import transformers  # noqa: F401  (as in this process)
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    monkeypatch.delenv("UNSLOTH_DISABLE_STATISTICS", raising=False)
    with pytest.raises(UnslothUnavailable, match="UNSLOTH_DISABLE_STATISTICS"):
        import_unsloth()
    monkeypatch.setenv("UNSLOTH_DISABLE_STATISTICS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnslothUnavailable, match="imported before unsloth"):
        import_unsloth()


def test_a_model_without_unsloths_fast_path_is_not_measured_as_unsloth(tiny_model):
    from job.config import from_env
    from job.model import add_lora, load_base_model, load_tokenizer
    from job.speed.plan import plan

    config = from_env({"BASE_MODEL": str(tiny_model), "REQUIRE_GPU": "false"})
    tokenizer = load_tokenizer(config)
    model = add_lora(config, load_base_model(config, tokenizer, "cpu", plan(config, "cpu")), tokenizer)
    with pytest.raises(UnslothUnavailable) as failed:
        fast_path(model, dropout=0.0, on_gpu=True)
    message = str(failed.value)
    for piece in ("decoder_layer_forward", "model_forward", "attention_forward", "gradient checkpointing"):
        assert piece in message, message
    # The seed's q_proj,v_proj leave Unsloth nothing to fuse (it fuses q/k/v only when all three carry LoRA), so
    # its unfused forward is not held against it.
    assert "apply_lora_qkv" not in message
    assert "NF4" not in message   # the job's base is NF4 (2 layers x 7 linears here), as Unsloth's must be


def test_the_configurations_are_the_seeds_math_and_its_dropout_0_best():
    assert unsloth_bench.SETTINGS["unsloth"] == (0.1, False)
    assert unsloth_bench.SETTINGS["unsloth-d0"] == (0.0, False)
    from speed import CONFIGS
    timed = [name for name in unsloth_bench.SETTINGS if not name.endswith("-e2e")]
    assert all(CONFIGS[name][:3] == ("unsloth", 4, 30) for name in timed)
    # The end-to-end race's (bench/e2e_race.py): every row of its file once, as many steps as that takes.
    assert unsloth_bench.SETTINGS["unsloth-e2e"] == unsloth_bench.SETTINGS["unsloth"]
    assert all(CONFIGS[name][:2] == ("unsloth", 4) and CONFIGS[name][3] == {"e2e": True}
               for name in unsloth_bench.SETTINGS if name not in timed)
