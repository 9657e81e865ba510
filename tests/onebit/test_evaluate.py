import json

import pytest
import torch

from lowbit.models import GPT, GPTConfig
from lowbit.onebit.evaluate import lm_eval_model

TEXT = "to be or not to be that is the question whether tis nobler in the mind to suffer " * 3


def tiny_gpt(vocab, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, n_layer=1, n_head=2, n_embd=16, block_size=32)).eval()


def test_lm_eval_missing_is_a_clear_import_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        lm_eval_model(tiny_gpt(10), None)


def test_lm_eval_harness_on_a_local_task(tmp_path, request, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional (`pip install lm-eval`)")
    tiny_hf_dir = request.getfixturevalue("tiny_hf_dir")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lowbit.models import load_causal_lm
    from lowbit.onebit import convert_to_onebit, pack_onebit
    from lowbit.onebit.evaluate import evaluate_tasks

    docs = [
        {"question": "The king is", "choices": [" dead", " here"], "label": 0},
        {"question": "To be or not to", "choices": [" be", " go"], "label": 0},
        {"question": "My lord, I", "choices": [" pray", " sword"], "label": 1},
    ]
    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_choice.yaml").write_text(
        "task: lowbit_tiny_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    model, tok = load_causal_lm(tiny_hf_dir)
    convert_to_onebit(model)
    pack_onebit(model)
    results = evaluate_tasks(model, tok, ["lowbit_tiny_choice"], include_path=tasks, batch_size=2)
    acc = results["lowbit_tiny_choice"]["acc,none"]
    assert acc in (0.0, 1 / 3, 2 / 3, 1.0)  # 3 documents: the accuracy is a multiple of 1/3
