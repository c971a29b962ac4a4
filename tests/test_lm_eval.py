"""lm-eval's `HFLM` on the model object with its defaults: a local multiple-choice task and a local `generate_until`
task over pass-key documents of ~5k tokens (ten windows of the shipped model), read whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longllama import LongLlamaForCausalLM
from longllama.cli import SHIPPED_MODEL
from longllama.evals import passkey
from longllama.tokenizer import load_tokenizer

lm_eval = pytest.importorskip("lm_eval")

FILLER_CHARS = 14000  # ~5k tokens
DEPTHS = (0.1, 0.4, 0.7)  # where the key sits: always before the last window
TRIALS = len(DEPTHS)


def _task_files(folder: Path, docs: list[dict]) -> None:
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        "task: longllama_passkey_choice\n" + data + "output_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: 0\ntarget_delimiter: " "\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    (folder / "gen.yaml").write_text(
        "task: longllama_passkey_until\n" + data + "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{key}}"\n'
        'generation_kwargs:\n  until: ["."]\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "filter_list:\n  - name: clean\n    filter:\n      - function: remove_whitespace\n"
        "      - function: take_first\n",
        encoding="utf-8",
    )


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("tasks")
    docs = []
    for seed, depth in enumerate(DEPTHS):
        prompt, key = passkey.passkey_prompt(FILLER_CHARS, seed, depth=depth)
        wrong = [str((key * 7 + 1111 * i) % 50000) for i in range(1, 4)]
        docs.append({"prompt": prompt, "key": str(key), "choices": [str(key), *wrong]})
    _task_files(folder, docs)
    tokenizer = load_tokenizer(SHIPPED_MODEL)
    model = LongLlamaForCausalLM.from_pretrained(SHIPPED_MODEL).eval()
    seen, generated = [], []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[1]), with_kwargs=True)
    plain_generate = model.generate

    def generate(*args, **kwargs):
        out = plain_generate(*args, **kwargs)
        generated.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    model.generate = generate
    lm = HFLM(pretrained=model, tokenizer=tokenizer)  # defaults only: max_length comes from the model
    with torch.no_grad():
        results = simple_evaluate(
            model=lm,
            tasks=["longllama_passkey_choice", "longllama_passkey_until"],
            task_manager=TaskManager(include_path=str(folder)),
        )
    tokens = [len(tokenizer(d["prompt"]).input_ids) for d in docs]
    return dict(results=results["results"], lm=lm, model=model, seen=seen, generated=generated, tokens=tokens)


def test_lm_eval_reads_the_whole_document(evaluated):
    assert evaluated["lm"].max_length == evaluated["model"].config.max_position_embeddings
    window = evaluated["model"].config.context_window
    assert min(evaluated["tokens"]) > 8 * window
    # One forward per (document, choice): context and continuation whole, nothing cut to the window.
    assert len(evaluated["seen"]) == 4 * TRIALS
    assert min(evaluated["seen"]) >= min(evaluated["tokens"])
    # Only the memory lets a reader of the last window answer: the key sits earlier in the document.
    assert evaluated["results"]["longllama_passkey_choice"]["acc,none"] == 1.0


def test_generate_until_stops_at_the_stop_sequence(evaluated):
    assert evaluated["results"]["longllama_passkey_until"]["exact_match,clean"] == 1.0
    # lm-eval's stopping criteria ended each generation at "." (a 5-digit key and the period: a few tokens), long
    # before its default budget of 256 new tokens.
    assert len(evaluated["generated"]) == TRIALS
    assert max(evaluated["generated"]) < 16
