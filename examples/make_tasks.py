"""Write the demo task suite: four tasks the base model fails zero-shot and a small adapter learns.

    python examples/make_tasks.py [--out examples/tasks] [--seed 0] [--train 400 --eval 24 --test 40]

Each task gets `<out>/<task>/{train,eval,test}.jsonl` (no input appears in two splits) and a
`task.json` naming its format and metric, which `loraplex eval` reads. The tasks are formats and
conventions a model cannot guess, not facts it cannot know:

  dates            instruction        a free-text date -> ISO 8601 (2021-03-05)        exact_match
  records          chat               a sentence -> a JSON record with fixed fields    exact_match
  support_routing  instruction        a product review -> one of five team labels      macro_f1
  units            prompt_completion  a metric unit conversion -> the number           exact_match

Same seed, same files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]  # 28 for February: no leap-day traps
FIRST_NAMES = ["Maria", "John", "Aiko", "Omar", "Lena", "Pedro", "Grace", "Ivan", "Chloe", "Ravi", "Nadia",
               "Tom", "Sofia", "Kwame", "Elena", "Hugo", "Mei", "Jonas", "Amara", "Felix"]
LAST_NAMES = ["Lopez", "Smith", "Tanaka", "Haddad", "Berg", "Costa", "Okafor", "Petrov", "Martin", "Rao",
              "Kowalski", "Reed", "Rossi", "Mensah", "Novak", "Dubois", "Chen", "Weber", "Diallo", "Moreau"]
JOBS = ["nurse", "teacher", "baker", "pilot", "engineer", "chef", "lawyer", "farmer", "painter", "dentist",
        "plumber", "librarian", "architect", "pharmacist", "carpenter"]
CITIES = ["Lyon", "Osaka", "Lagos", "Denver", "Porto", "Krakow", "Austin", "Leeds", "Turin", "Pune",
          "Accra", "Bergen", "Quebec", "Seville", "Dresden"]
PRODUCTS = ["jacket", "blender", "phone case", "backpack", "lamp", "kettle", "sneakers", "desk chair",
            "headphones", "water bottle", "rug", "toaster", "dress", "tent", "keyboard", "coat", "frying pan",
            "monitor", "suitcase", "hoodie", "drill", "mattress", "watch", "camera", "scarf", "printer", "boots",
            "coffee maker", "umbrella", "jeans"]
ROUTING_TEMPLATES = {  # label -> review templates; {p} is the product
    "shipping": ["The {p} arrived two weeks late.", "My {p} came in a crushed box after a long delay.",
                 "Tracking for the {p} never updated and it showed up late.", "The courier left the {p} at the wrong address.",
                 "Still waiting for my {p}, the delivery date keeps moving."],
    "quality": ["The {p} broke after three days.", "The stitching on the {p} came apart quickly.",
                "The {p} feels cheap and stopped working.", "After one week the {p} was already cracked.",
                "The {p} is flimsy and fell apart on first use."],
    "billing": ["I was charged twice for the {p}.", "The {p} cost more at checkout than the listed price.",
                "My refund for the {p} never reached my card.", "The invoice for the {p} shows the wrong amount.",
                "A discount code for the {p} was not applied to my bill."],
    "sizing": ["The {p} runs two sizes too small.", "The {p} is much larger than the size chart said.",
               "I ordered a medium {p} and it fits like an extra large.", "The {p} is too tight even in my usual size.",
               "The measurements of the {p} do not match the listing."],
    "service": ["Support never answered my emails about the {p}.", "The agent on the phone was rude about my {p}.",
                "Nobody from customer care replied about the {p}.", "I was put on hold for an hour about my {p}.",
                "The help desk closed my {p} ticket without a reply."],
}
UNITS = [("km", "m", 1000), ("kg", "g", 1000), ("m", "cm", 100), ("L", "mL", 1000), ("cm", "mm", 10)]


def date_record(rng: random.Random) -> dict:
    year, month = rng.randint(1990, 2030), rng.randint(1, 12)
    day = rng.randint(1, DAYS_IN_MONTH[month - 1])
    name = MONTHS[month - 1]
    suffix = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd", 31: "st"}.get(day, "th")
    text = rng.choice([f"{name} {day}, {year}", f"{day} {name} {year}", f"the {day}{suffix} of {name}, {year}",
                       f"{name[:3]} {day} {year}"])
    return {"instruction": "Rewrite the date in ISO 8601 format.", "input": text, "output": f"{year:04d}-{month:02d}-{day:02d}"}


def person_record(rng: random.Random) -> dict:
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    age, job, city = rng.randint(19, 79), rng.choice(JOBS), rng.choice(CITIES)
    sentence = rng.choice([f"{name} is a {age}-year-old {job} from {city}.", f"{name}, {age}, works as a {job} in {city}.",
                           f"Meet {name}: a {job} living in {city}, aged {age}.", f"In {city}, the {job} {name} turned {age}."])
    record = json.dumps({"name": name, "age": age, "job": job, "city": city})
    return {"messages": [{"role": "system", "content": "Extract the person as a JSON record."},
                         {"role": "user", "content": sentence}, {"role": "assistant", "content": record}]}


def routing_record(rng: random.Random) -> dict:
    label = rng.choice(sorted(ROUTING_TEMPLATES))
    review = rng.choice(ROUTING_TEMPLATES[label]).format(p=rng.choice(PRODUCTS))
    return {"instruction": "Which team should handle this review?", "input": review, "output": label}


def unit_record(rng: random.Random) -> dict:
    source, target, factor = rng.choice(UNITS)
    amount = rng.randint(2, 999)
    return {"prompt": f"Convert {amount} {source} to {target}.\nAnswer:", "completion": f" {amount * factor}"}


TASKS: dict[str, tuple[str, str, Callable[[random.Random], dict]]] = {  # name -> (format, metric, make)
    "dates": ("instruction", "exact_match", date_record),
    "records": ("chat", "exact_match", person_record),
    "support_routing": ("instruction", "macro_f1", routing_record),
    "units": ("prompt_completion", "exact_match", unit_record),
}


def record_key(record: dict) -> str:
    """What makes two records the same question (the answer follows from it)."""
    if "messages" in record:
        return record["messages"][1]["content"]
    return record.get("input") or record["prompt"]


def make_splits(make: Callable[[random.Random], dict], rng: random.Random, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """Distinct records split so that no question appears in two splits."""
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in sizes.items():
        records: list[dict] = []
        attempts = 0
        while len(records) < size:
            attempts += 1
            if attempts > 100 * size:
                raise SystemExit(f"cannot draw {size} distinct {split} records; lower the split sizes")
            record = make(rng)
            if record_key(record) not in seen:
                seen.add(record_key(record))
                records.append(record)
        splits[split] = records
    return splits


def write_lines(path: Path, lines: list[str]) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(staging, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "tasks"), help="folder for the task folders")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--eval", type=int, default=24)
    parser.add_argument("--test", type=int, default=40)
    args = parser.parse_args()
    sizes = {"train": args.train, "eval": args.eval, "test": args.test}
    for index, (name, (data_format, metric, make)) in enumerate(TASKS.items()):
        folder = Path(args.out) / name
        folder.mkdir(parents=True, exist_ok=True)
        splits = make_splits(make, random.Random(args.seed * 1000 + index), sizes)
        for split, records in splits.items():
            write_lines(folder / f"{split}.jsonl", [json.dumps(r, ensure_ascii=False) for r in records])
        write_lines(folder / "task.json", [json.dumps({"format": data_format, "metric": metric})])
        print(f"{folder}: " + ", ".join(f"{split} {len(records)}" for split, records in splits.items()))


if __name__ == "__main__":
    main()
