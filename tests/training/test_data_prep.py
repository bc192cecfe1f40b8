"""Cleaning, duplicate removal, quality filters and negative samples, with their counts."""

from training.data_prep import PrepSettings, clean_text, negative_samples, prepare_records, repetition_ratio


def test_clean_text_normalises_whitespace_and_controls():
    assert clean_text("  a\x00b \t c\u00a0 d \r\n\n\n\n e  ") == "ab c d\n\ne"
    assert clean_text("e\u0301") == "\u00e9"  # NFC


def test_prepare_counts_each_step():
    story = "the quick brown fox jumps over the lazy dog near the quiet river bank today"
    records = [
        {"prompt": "q1", "completion": f" {story}"},
        {"prompt": "Q1 ", "completion": f" {story}"},  # exact duplicate once cleaned, case ignored
        {"prompt": "q2", "completion": f" {story} again"},  # near duplicate
        {"prompt": "q3", "completion": " spam spam spam spam spam spam spam spam"},  # repetitive
        {"prompt": "q4", "completion": " a completely different answer about cooking pasta at home"},
        {"prompt": "", "completion": " x"},  # too short
    ]
    kept, counts = prepare_records(records, PrepSettings(min_words=3, max_repetition=0.5, near_duplicate_threshold=0.7))
    assert [r["prompt"] for r in kept] == ["q1", "q4"]
    assert counts == {"input": 6, "cleaned": 1, "dropped_length": 1, "dropped_repetition": 1,
                      "dropped_exact_duplicate": 1, "dropped_near_duplicate": 1, "kept": 2}
    assert kept[0]["completion"].startswith(" the")  # a completion keeps its leading space


def test_repetition_ratio():
    assert repetition_ratio("a b c d e".split()) == 0.0
    assert repetition_ratio("a b a b a b".split()) == 0.5


def test_negative_samples_pair_each_input_with_wrong_labels():
    records = [{"instruction": "classify", "input": "great", "output": "positive"},
               {"instruction": "classify", "input": "awful", "output": "negative"}]
    out = negative_samples(records, per_record=1)
    assert len(out) == 4
    assert [r["output"] for r in out] == ["yes", "no", "yes", "no"]
    assert "'negative'" in out[1]["instruction"] and "great" in out[1]["input"]
