"""Data formats, the loss mask, the chat template, over-long policies and bad lines."""

import pytest

from backbone.tokenizer import Tokenizer
from training.batching import IGNORE_INDEX, collate
from training.data import DataError, load_task_file

from training_files import write_jsonl


@pytest.fixture(scope="module")
def tokenizer(toy_model_dir):
    return Tokenizer.from_folder(toy_model_dir)


def _answer_text(tokenizer, example):
    return tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m], skip_special_tokens=False)


def test_instruction_record_uses_the_chat_template_and_masks_the_prompt(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "what is 2 plus 3", "input": "the answer", "output": "5"}])
    (example,) = load_task_file(path, "instruction", tokenizer, max_length=64).examples
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "what is 2 plus 3\n\nthe answer"}], add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "what is 2 plus 3\n\nthe answer"}, {"role": "assistant", "content": "5"}], add_generation_prompt=False
    )
    assert example.input_ids == tokenizer.encode(full)
    assert example.loss_mask == [False] * len(tokenizer.encode(prompt)) + [True] * (len(tokenizer.encode(full)) - len(tokenizer.encode(prompt)))
    assert _answer_text(tokenizer, example) == "5 <|end|>"  # the answer and the template's end of turn


def test_chat_record_trains_on_assistant_turns_only(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "say yes"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "yes yes"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "no"},
    ]
    (example,) = load_task_file(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]), "chat", tokenizer, 64).examples
    assert _answer_text(tokenizer, example) == "yes yes <|end|> no <|end|>"
    assert example.input_ids == tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False))


def test_prompt_completion_is_raw_text_with_eos(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "copy 1 2", "completion": "1 2"}])
    (example,) = load_task_file(path, "prompt_completion", tokenizer, 64).examples
    assert example.input_ids == tokenizer.encode("copy 1 2") + tokenizer.encode("1 2") + [tokenizer.eos_token_id]
    assert example.loss_mask == [False, False, False, True, True, True]


def test_labels_are_next_tokens_on_answer_positions_only(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "copy 1 2", "completion": "1 2"}, {"prompt": "copy 3", "completion": "3"}])
    examples = load_task_file(path, "prompt_completion", tokenizer, 64).examples
    batch = collate([(0, examples[0]), (1, examples[1])], pad_id=0)
    ids = examples[0].input_ids
    assert batch.labels[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, ids[3], ids[4], ids[5], IGNORE_INDEX]
    assert batch.labels[1].tolist()[-2:] == [IGNORE_INDEX, IGNORE_INDEX]  # padding is never a target
    assert batch.num_answer_tokens == 3 + 2


def test_overlong_examples_truncate_or_drop_with_counts(tmp_path, tokenizer):
    records = [{"prompt": "copy 1 2 3 4 5 6", "completion": "1 2 3 4 5 6"}, {"prompt": "copy 1", "completion": "1"},
               {"prompt": "copy 1 2 3 4 5 6 7 8 9 10", "completion": "1"}]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    truncated = load_task_file(path, "prompt_completion", tokenizer, max_length=10, overlong="truncate")
    assert truncated.report() == {"lines": 3, "examples": 2, "truncated": 1, "dropped_overlong": 0, "dropped_no_answer": 1}
    assert max(len(e) for e in truncated.examples) == 10
    dropped = load_task_file(path, "prompt_completion", tokenizer, max_length=10, overlong="drop")
    assert dropped.report() == {"lines": 3, "examples": 1, "truncated": 0, "dropped_overlong": 2, "dropped_no_answer": 0}


def test_a_bad_line_names_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*'output'"):
        load_task_file(path, "instruction", tokenizer, 64)
    path.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_task_file(path, "prompt_completion", tokenizer, 64)
