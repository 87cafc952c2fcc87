"""The model card (README.md) pushed with the adapter: metadata, settings, losses, hardware, usage."""
from __future__ import annotations

import json
from pathlib import Path

from .config import Config, is_hub_id, is_local_model
from .data import TEMPLATE, is_local_dataset
from .plot import LOSS_CURVE

EXAMPLE_PERSONA = ["I keep bees on my roof.", "I work as a night nurse.", "My favourite food is ramen."]


def model_card(config: Config, final_dir: Path, merged: bool = False) -> str:
    summary = json.loads((final_dir / "training_summary.json").read_text())
    settings = summary["config"]
    dataset = None if is_local_dataset(config.dataset) else config.dataset
    meta = ["---"]
    base_model = hub_base_model(config)
    if base_model:  # the Hub refuses a card whose base_model is not a repo id on it (a local path)
        meta.append(f"base_model: {base_model}")
    if dataset:
        meta += ["datasets:", f"- {dataset}"]
    meta += ["library_name: transformers" if merged else "library_name: peft", "license: llama2",
             "pipeline_tag: text-generation", "tags:", "- persona-chat", "- qlora", "- lora", "- peft",
             "- llama-2", "---", ""]
    shown = ["LORA_R", "LORA_ALPHA", "LORA_DROPOUT", "LORA_TARGET_MODULES", "PER_DEVICE_TRAIN_BATCH_SIZE",
             "GRADIENT_ACCUMULATION_STEPS", "LEARNING_RATE", "LR_SCHEDULER_TYPE", "WARMUP_STEPS", "OPTIM",
             "NUM_TRAIN_EPOCHS", "MAX_STEPS", "MAX_SEQ_LENGTH", "NUM_SAMPLES", "SEED", "COMPUTE_DTYPE"]
    body = [
        f"# {config.hub_model_id or config.resolved_run_id}",
        "",
        f"A {'merged 16-bit model' if merged else 'LoRA adapter'} for `{config.base_model}` that answers as "
        f"*Persona B*, a character described by a few facts, trained with 4-bit QLoRA on "
        f"`{config.dataset}` by the persona-qlora job (run `{summary['run_id']}`).",
        "",
        "## Training",
        "",
        f"- data: {summary['train_rows']} training rows and {summary['eval_rows']} held-out rows "
        f"(whole conversations held out), drawn after a seeded shuffle",
        f"- steps: {summary['steps']}, tokens trained on: {summary['train_tokens']}",
        f"- hardware: {summary['device']}; wall time {summary['wall_time_seconds']:.0f} s; "
        f"{summary['tokens_per_second']} tokens/s",
        f"- final eval loss: {_num(summary['final_eval_loss'])}",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {name} | {settings[name]} |" for name in shown if name in settings],
        "",
        "### Loss by step",
        "",
        *([f"![Train and eval loss by step]({LOSS_CURVE})", ""] if (final_dir / LOSS_CURVE).exists() else []),
        "| step | train loss | eval loss |",
        "|---|---|---|",
        *_loss_rows(summary),
        "",
        *_evaluation(summary.get("evaluation")),
        "## Prompt template",
        "",
        "Training, evaluation and this example use one Llama-2 chat template. The persona sits between the "
        "added tokens `<persona_b>` and `</persona_b>` in the system block:",
        "",
        "```text",
        TEMPLATE.render(EXAMPLE_PERSONA, [("Hi! What keeps you busy?", "Night shifts, mostly. I'm a nurse.")],
                        next_user="Do you have any hobbies?"),
        "```",
        "",
        "## Usage",
        "",
        "```python",
        *(_usage_merged(config) if merged else _usage_adapter(config)),
        "```",
    ]
    if merged:
        body += ["", "Merged onto the 16-bit base weights (not dequantized 4-bit ones). Loading it takes "
                     "about 2 bytes per parameter: ~13.5 GB for a 7B model in bfloat16."]
    return "\n".join(meta + body) + "\n"


def hub_base_model(config: Config) -> str | None:
    """The Hub id the adapter was trained from: BASE_MODEL_ID when set; else BASE_MODEL when it is one, else the
    `_name_or_path` a local copy's config.json remembers when that is one; None when neither is (a model built or
    converted locally)."""
    if config.base_model_id:   # a Hub id: the config checked it
        return config.base_model_id
    name = config.base_model
    local = Path(name)
    if local.exists():
        try:
            name = json.loads((local / "config.json").read_text()).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            return None
    if isinstance(name, str) and name and not is_local_model(name) and is_hub_id(name):
        return name
    return None


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def _evaluation(evaluation: dict | None) -> list[str]:
    """Base against tuned on the held-out conversations, and a few replies side by side."""
    if not evaluation:
        return []
    base, tuned = evaluation["base"], evaluation["tuned"]
    rows = [("held-out reply loss (lower is better)", "loss"), ("perplexity", "perplexity"),
            ("unigram F1 of greedy replies vs reference", "reply_f1"),
            ("persona word overlap (proxy, 0-1)", "persona_overlap"), ("NLI C-score", "c_score"),
            ("replies entailing a persona fact", "entailed_share"),
            ("replies contradicting a persona fact", "contradicted_share")]
    reference = evaluation.get("reference", {})
    lines = ["## Evaluation", "",
             f"On {evaluation['heldout_rows']} held-out rows from conversations never trained on "
             f"({evaluation['generated_rows']} answered greedily). Losses cover Persona B's reply tokens only. "
             f"Persona consistency: {evaluation['consistency_method']}.", "",
             "| | base model | tuned adapter | human reference |", "|---|---|---|---|"]
    lines += [f"| {label} | {_num(base.get(key))} | {_num(tuned.get(key))} | "
              f"{_num(reference[key]) if key in reference else ''} |"
              for label, key in rows if key in base or key in tuned]
    samples = evaluation.get("samples") or []
    if samples:
        lines += ["", "### Sample replies", ""]
        for i, sample in enumerate(samples, 1):
            last_user = sample["context"][-1][0]
            lines += [f"**{i}.** Persona: {' '.join(sample['persona'])}", "",
                      f"- user: {_quote(last_user)}", f"- reference: {_quote(sample['reference'])}",
                      f"- base: {_quote(sample['base_reply'])}", f"- tuned: {_quote(sample['tuned_reply'])}", ""]
    return lines + [""]


def _quote(text: str) -> str:
    flat = " ".join(str(text).split()) or "(empty)"
    return "`" + flat.replace("`", "'") + "`"


def _loss_rows(summary: dict) -> list[str]:
    train = {e["step"]: e["loss"] for e in summary["train_loss"]}
    evals = {e["step"]: e["loss"] for e in summary["eval_loss"]}
    steps = sorted(set(train) | set(evals))
    if len(steps) > 20:  # keep the table short: about 20 rows, always with the last step
        stride = -(-len(steps) // 20)
        steps = sorted(set(steps[::stride]) | {steps[-1]} | set(evals))
    return [f"| {s} | {_num(train.get(s))} | {_num(evals.get(s))} |" for s in steps]


def _usage_adapter(config: Config) -> list[str]:
    repo = config.hub_model_id or "OUTPUT_DIR"
    return [
        "import torch",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")  # has <persona_b> and </persona_b>',
        f'base = AutoModelForCausalLM.from_pretrained("{config.base_model}", device_map="auto",',
        '    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",',
        "                                           bnb_4bit_compute_dtype=torch.bfloat16))",
        "base.resize_token_embeddings(len(tokenizer))  # room for the persona tokens; the adapter sets their rows",
        f'model = PeftModel.from_pretrained(base, "{repo}")',
        *_generate_lines(),
    ]


def _usage_merged(config: Config) -> list[str]:
    return [
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{config.hub_model_id}", revision="{config.hub_merged_revision}")',
        f'model = AutoModelForCausalLM.from_pretrained("{config.hub_model_id}", '
        f'revision="{config.hub_merged_revision}", dtype=torch.bfloat16, device_map="auto")',
        *_generate_lines(),
    ]


def _generate_lines() -> list[str]:
    prompt = TEMPLATE.render(EXAMPLE_PERSONA, [], next_user="Hi! What keeps you busy?")
    return [
        "",
        f"prompt = {prompt!r}",
        "inputs = tokenizer(prompt, add_special_tokens=False, return_tensors=\"pt\").to(model.device)",
        "reply = model.generate(**inputs, max_new_tokens=64)",
        "print(tokenizer.decode(reply[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))",
    ]
