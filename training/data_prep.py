"""Data preparation before tokenization: text cleaning, exact and near-duplicate removal,
quality filters, and negative samples for classification tasks. Every step counts what it
changed; the counts go to the run's log.

Near duplicates: MinHash signatures over word 3-shingles, bucketed by LSH bands; a pair in a
shared bucket is a duplicate when its estimated Jaccard similarity reaches the threshold.
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Any

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_MERSENNE = (1 << 61) - 1


@dataclass
class PrepSettings:
    clean: bool = True  # normalise unicode (NFC), drop control characters, collapse spaces
    dedupe: bool = True  # drop exact duplicates (after cleaning, case and spacing ignored)
    near_duplicate_threshold: float | None = 0.8  # Jaccard of word 3-shingles; None = off
    min_words: int = 0  # records with fewer words in total are dropped
    max_words: int | None = None
    max_repetition: float | None = 0.5  # drop records whose word 3-grams repeat more than this share


def clean_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def record_texts(record: dict[str, Any]) -> list[str]:
    """Every text field of a record in any format, in a fixed order."""
    if "messages" in record:
        return [m.get("content", "") for m in record["messages"] if isinstance(m, dict)]
    return [record[k] for k in ("instruction", "input", "output", "prompt", "completion") if isinstance(record.get(k), str)]


def clean_record(record: dict[str, Any]) -> dict[str, Any]:
    out = dict(record)
    if isinstance(out.get("messages"), list):
        out["messages"] = [
            {**m, "content": clean_text(m["content"])} if isinstance(m, dict) and isinstance(m.get("content"), str) else m
            for m in out["messages"]
        ]
    for key in ("instruction", "input", "output", "prompt"):
        if isinstance(out.get(key), str):
            out[key] = clean_text(out[key])
    if isinstance(out.get("completion"), str):
        out["completion"] = _clean_keep_lead(out["completion"])
    return out


def _clean_keep_lead(text: str) -> str:
    # A completion's leading space is part of the tokenization its prompt expects.
    lead = " " if text[:1] == " " else ""
    return lead + clean_text(text)


def _words(record: dict[str, Any]) -> list[str]:
    return " ".join(record_texts(record)).lower().split()


def repetition_ratio(words: list[str]) -> float:
    """Share of word 3-grams that repeat an earlier one (0 = none repeat)."""
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def minhash(words: list[str], num_perm: int = 64, seed: int = 0) -> list[int]:
    shingles = {" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))}
    hashes = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in shingles]
    rng = random.Random(seed)
    params = [(rng.randrange(1, _MERSENNE), rng.randrange(0, _MERSENNE)) for _ in range(num_perm)]
    return [min((a * h + b) % _MERSENNE for h in hashes) for a, b in params]


def near_duplicates(signatures: list[list[int]], threshold: float, bands: int = 16) -> set[int]:
    """Indices to drop: each a near duplicate of an earlier kept signature."""
    rows = len(signatures[0]) // bands if signatures else 0
    buckets: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    dropped: set[int] = set()
    for index, signature in enumerate(signatures):
        candidates = set()
        keys = [(band, tuple(signature[band * rows : (band + 1) * rows])) for band in range(bands)]
        for key in keys:
            candidates.update(buckets.get(key, []))
        if any(sum(a == b for a, b in zip(signature, signatures[c])) / len(signature) >= threshold for c in candidates):
            dropped.add(index)
            continue
        for key in keys:
            buckets.setdefault(key, []).append(index)
    return dropped


def prepare_records(records: list[dict[str, Any]], settings: PrepSettings) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Apply the preparation steps in order; returns the kept records and the counts."""
    counts = Counter({"input": len(records)})
    if settings.clean:
        cleaned = [clean_record(r) for r in records]
        counts["cleaned"] = sum(a != b for a, b in zip(records, cleaned))
        records = cleaned
    kept = []
    for record in records:
        words = _words(record)
        if len(words) < settings.min_words or (settings.max_words is not None and len(words) > settings.max_words):
            counts["dropped_length"] += 1
        elif settings.max_repetition is not None and repetition_ratio(words) > settings.max_repetition:
            counts["dropped_repetition"] += 1
        else:
            kept.append(record)
    records = kept
    if settings.dedupe:
        seen, kept = set(), []
        for record in records:
            key = "\x1f".join(" ".join(t.lower().split()) for t in record_texts(record))
            if key in seen:
                counts["dropped_exact_duplicate"] += 1
                continue
            seen.add(key)
            kept.append(record)
        records = kept
    if settings.near_duplicate_threshold is not None and records:
        dropped = near_duplicates([minhash(_words(r)) for r in records], settings.near_duplicate_threshold)
        counts["dropped_near_duplicate"] = len(dropped)
        records = [r for i, r in enumerate(records) if i not in dropped]
    counts["kept"] = len(records)
    return records, dict(counts)


def negative_samples(
    records: list[dict[str, Any]], per_record: int = 1, seed: int = 0,
    question: str = "Is the label {label!r} correct for this input? Answer yes or no.",
) -> list[dict[str, Any]]:
    """For a classification task in instruction format (the `output` is a label from a small
    set), verification examples: each record with its true label -> "yes", and with `per_record`
    other labels -> "no", so the adapter also learns what an input is not."""
    labels = sorted({r["output"] for r in records})
    if len(labels) < 2:
        raise ValueError("negative samples need at least two distinct labels in `output`; this task has fewer")
    rng = random.Random(seed)
    out = []
    for record in records:
        text = "\n\n".join(t for t in (record.get("instruction", ""), record.get("input", "")) if t)
        out.append({"instruction": question.format(label=record["output"]), "input": text, "output": "yes"})
        wrong = [label for label in labels if label != record["output"]]
        for label in rng.sample(wrong, min(per_record, len(wrong))):
            out.append({"instruction": question.format(label=label), "input": text, "output": "no"})
    return out
