"""Training throughput and gradient-surgery cost on the default model (SmolLM2-135M), r=16 on all
linear modules, 4 tasks, the same token batches for every variant. Prints JSON.

Throughput (each variant in its own process, so peak RSS is its own; the variants alternate over
`--rounds` and each keeps its fastest step, since neighbours on a shared machine only add time):
  peft         the reference as a PEFT user runs it: transformers LlamaForCausalLM (sdpa attention,
               its default; use_cache=False, as for training: the default True builds a KV cache
               no step reads; no gradient checkpointing) + PEFT get_peft_model (LoraConfig r=16,
               alpha=32, "all-linear": the 7 projections of every layer, not the tied lm_head),
               model(input_ids, labels=...).loss (transformers' own loss: fp32 logits at every
               position, mean over the labelled tokens, the same loss as ours), backward, clip,
               torch AdamW. One adapter: PEFT trains one adapter per batch; all rows go through it.
               The batch right-padded, no attention mask: causal attention keeps the padding after
               a row's end out of its logits, and sdpa then takes its mask-free causal kernel
  peft_packed  the same, padding-free: the rows end to end in one sequence with position ids that
               restart per row (transformers' DataCollatorWithFlattening, TRL's padding_free), from
               which transformers builds a block-diagonal causal mask; no compute on padding
               Ours is compared with the stronger reference on each axis: the faster one's tokens/s,
               the leaner one's peak RSS. Neither computes logits at the answer positions only, as ours
               does: transformers' logits_to_keep keeps the last positions of every row alike,
               which does not fit rows of different lengths, and no PEFT recipe does it by default.
  ours_1task   our trainer, the same batch, one task adapter
  ours_4task   our trainer, the same batch split over 4 task adapters (mixed batch)
With --ablation, two more variants show what each speed-up gave (4 tasks, mixed batch):
  ours_4task_padded  the micro-batch in one padded forward, each row gathering its adapter's
                     weights (no length buckets, no per-adapter slices); fused AdamW
  ours_4task_before  as ours_4task_padded with the unfused AdamW: the trainer before both
Surgery cost (one process, one model with 4 task adapters + a shared one, the three step kinds
interleaved step by step so they see the same machine):
  plain        no surgery, an ordinary backward
  pcgrad       PCGrad on the shared adapter, per-task gradients binned in ONE backward
  pcgrad_T_backward  the reference way (LibMTL): one forward, T backward passes for the per-task
               gradients of the shared adapter, then PCGrad

With --interleaved, only the step times of peft, peft_packed and ours_4task, in one process, one
step of each in turn (`--steps` rounds), so that all see the same machine; on a busy machine this
compares them under the same load (their peak RSS stays the separate runs' figure). The three share
one heap and caches, so a variant's time here can differ from its time alone.

    .venv/bin/python bench/train.py [--quick] [--ablation] [--interleaved] [--steps N] [--rows R] [--length L] [--device cuda --dtype bfloat16]

With --device/--dtype, every variant's frozen base is in that dtype on that device (PEFT's too);
the LoRA weights and AdamW state stay fp32 in all of them, as PEFT keeps them by default.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.batching import collate  # noqa: E402
from training.data import Example  # noqa: E402
from bench_precision import add_args as add_precision_args, peak_memory, resolve as resolve_precision, synchronize  # noqa: E402

RANK, TASKS = 16, 4
REFERENCES = ("peft", "peft_packed")
VARIANTS = REFERENCES + ("ours_1task", "ours_4task", "surgery")
ABLATIONS = ("ours_4task_padded", "ours_4task_before")


def make_batch(rows: int, length: int, vocab: int, tasks: int, seed: int = 0):
    """Rows of lengths in [length/2, length], the last third of each the answer; tasks round-robin."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for row in range(rows):
        size = int(torch.randint(length // 2, length + 1, (1,), generator=generator))
        ids = torch.randint(10, vocab, (size,), generator=generator).tolist()
        answer = size // 3
        examples.append((row % tasks, Example(ids, [False] * (size - answer) + [True] * answer)))
    return collate(examples, pad_id=0)


def hf_labels(batch) -> torch.Tensor:
    """Labels as transformers takes them, unshifted (its loss shifts them): token t is labelled
    where our shifted label at t-1 is; the first token of a row never is."""
    labels = torch.full_like(batch.labels, -100)
    labels[:, 1:] = batch.labels[:, :-1]
    return labels


def packed_inputs(batch) -> dict[str, torch.Tensor]:
    """The rows without their padding, end to end in one (1, tokens) sequence, positions restarting
    at 0 on each row: transformers' padding-free format (DataCollatorWithFlattening, TRL's
    padding_free), from which it builds a block-diagonal causal mask, so no row sees another."""
    labels = hf_labels(batch)
    rows = range(len(batch.lengths))
    ends = batch.lengths.tolist()
    return {
        "input_ids": torch.cat([batch.input_ids[r, : ends[r]] for r in rows])[None],
        "position_ids": torch.cat([torch.arange(ends[r]) for r in rows])[None],
        "labels": torch.cat([labels[r, : ends[r]] for r in rows])[None],
    }


def peft_model(folder: Path, dtype: torch.dtype, device: torch.device):
    """The reference model: transformers' Llama with sdpa attention and PEFT's LoRA on all linear
    modules, in training mode."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))
    model.train()
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # fp32 LoRA weights over the low-precision base, as ours
    return model


def reference_inputs(batch, packed: bool) -> dict[str, torch.Tensor]:
    return packed_inputs(batch) if packed else {"input_ids": batch.input_ids, "labels": hf_labels(batch)}


def peft_step(model, batch, dtype: torch.dtype, device: torch.device, packed: bool):
    """A closure running one reference training step on `batch`."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    inputs = {name: tensor.to(device) for name, tensor in reference_inputs(batch, packed).items()}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        # transformers' own loss: fp32 logits, mean over the labelled tokens (= our sum / answer tokens)
        model(**inputs, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()

    return step


def run_peft(folder: Path, batch, steps: int, dtype: torch.dtype, device: torch.device, packed: bool) -> list[float]:
    step = peft_step(peft_model(folder, dtype, device), batch, dtype, device, packed)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times[1:]  # the first step warms up allocators and kernels


def run_interleaved(folder: Path, batch, steps: int, dtype: torch.dtype, device: torch.device) -> dict[str, list[float]]:
    """Step times of the references and our 4-task trainer in ONE process, step by step in turn, so
    each sees the same machine: on a busy machine the load moves between processes' runs more than
    the variants differ. The peak RSS stays the separate processes' figure."""
    from training.length_buckets import MAX_PADDING
    from training.step import train_step
    from training.surgery import Surgery

    reference = peft_model(folder, dtype, device)
    model, adapters, optimizer = _our_setup(folder, TASKS, False, dtype, device)
    surgery = Surgery("none", TASKS, seed=0)
    kinds = {
        "peft": peft_step(reference, batch, dtype, device, packed=False),
        "peft_packed": peft_step(reference, batch, dtype, device, packed=True),
        "ours_4task": lambda: train_step(model, adapters, optimizer, surgery, [batch], 1.0, 1.0, max_padding=MAX_PADDING),
    }
    return step_times_in_turn(kinds, steps, device)


def step_times_in_turn(kinds: dict[str, Callable[[], None]], steps: int, device: torch.device) -> dict[str, list[float]]:
    """Each kind's step times over `steps` rounds, one step of each kind in turn per round, so
    all kinds see the same state of the machine; a first round warms up and is not counted."""
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for round_index in range(steps + 1):
        for name, step in kinds.items():
            start = time.perf_counter()
            step()
            synchronize(device)
            if round_index:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    return times


def _our_setup(folder: Path, tasks: int, shared: bool, dtype: torch.dtype, device: torch.device, fused_adamw: bool = True):
    from adapters.config import LoraConfig
    from backbone import load_model
    from training.optim import build_optimizer, param_groups
    from training.task_adapters import AdapterSource, TaskAdapters

    model = load_model(folder, dtype=dtype, device=device)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear")
    sources = [AdapterSource(f"task{t}", config) for t in range(tasks)]
    adapters = TaskAdapters(model, sources, AdapterSource("shared", config) if shared else None, seed=0)
    adapters.make_trainable()
    groups = param_groups(adapters.named_parameters(), 1e-4, 0.0, model.config.num_hidden_layers)
    optimizer = build_optimizer(groups, (0.9, 0.999), 1e-8) if fused_adamw else torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    return model, adapters, optimizer


def run_ours(folder: Path, batch, steps: int, tasks: int, dtype: torch.dtype, device: torch.device, variant: str) -> list[float]:
    from training.length_buckets import MAX_PADDING
    from training.step import train_step
    from training.surgery import Surgery

    padded = variant in ABLATIONS
    model, adapters, optimizer = _our_setup(folder, tasks, False, dtype, device, fused_adamw=variant != "ours_4task_before")
    batch.task_ids = batch.task_ids % tasks
    surgery = Surgery("none", tasks, seed=0)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        train_step(model, adapters, optimizer, surgery, [batch], 1.0, 1.0, max_padding=None if padded else MAX_PADDING)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times[1:]


def t_backward_pcgrad_step(model, adapters, optimizer, batch) -> None:
    """Per-task shared gradients from T backward passes over one forward (retain_graph), then PCGrad."""
    from training.step import token_losses
    from training.surgery import pcgrad

    params = [p for _, p in adapters.named_parameters()]
    shared = adapters.slot_parameters(adapters.shared_slot)
    shared_ids = {id(p) for p in shared}
    optimizer.zero_grad(set_to_none=True)
    losses = token_losses(model, adapters, batch) / batch.num_answer_tokens
    task_grads = []
    for task in range(TASKS):
        grads = torch.autograd.grad(losses[batch.task_ids.to(losses.device) == task].sum(), params, retain_graph=task < TASKS - 1, allow_unused=True)
        by_param = dict(zip(map(id, params), grads))
        for param, grad in zip(params, grads):
            if grad is not None and id(param) not in shared_ids:
                param.grad = grad if param.grad is None else param.grad + grad
        task_grads.append(torch.cat([by_param[id(p)].reshape(-1) for p in shared]))
    adapters.set_shared_grad(pcgrad(torch.stack(task_grads)))
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


def run_surgery(folder: Path, batch, steps: int, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """Fastest step of each kind, the kinds interleaved on one model."""
    from training.step import train_step
    from training.surgery import Surgery

    model, adapters, optimizer = _our_setup(folder, TASKS, shared=True, dtype=dtype, device=device)
    plain, pcgrad = Surgery("none", TASKS, seed=0), Surgery("pcgrad", TASKS, seed=0)

    def detach_bins() -> None:
        for layer in adapters.layers.values():
            layer.task_grads = None  # an ordinary backward: no per-task bins

    def plain_step() -> None:
        detach_bins()
        train_step(model, adapters, optimizer, plain, [batch], 1.0, 1.0)

    def pcgrad_step() -> None:
        adapters.attach_task_grad_sinks()
        train_step(model, adapters, optimizer, pcgrad, [batch], 1.0, 1.0)

    def t_backward_step() -> None:
        detach_bins()
        t_backward_pcgrad_step(model, adapters, optimizer, batch)

    kinds = {"plain": plain_step, "pcgrad": pcgrad_step, "pcgrad_T_backward": t_backward_step}
    return {name: min(times) for name, times in step_times_in_turn(kinds, steps, device).items()}


def child(args: argparse.Namespace) -> None:
    from backbone.model_source import resolve_model

    torch.set_num_threads(args.threads)
    precision = resolve_precision(args)
    dtype, device = precision.dtype, precision.device
    folder = resolve_model("default", progress=False)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    batch = make_batch(args.rows, args.length, vocab, TASKS)
    tokens = int(batch.lengths.sum())
    if args.variant == "interleaved":
        times = run_interleaved(folder, batch, args.steps, dtype, device)
        print(json.dumps({"variant": "interleaved", "tokens": tokens, **{name: {
            "min_step_s": min(t), "median_step_s": sorted(t)[len(t) // 2], "tokens_per_s": tokens / min(t)} for name, t in times.items()},
            "tokens_per_s_ours_4task_vs": {name: min(times[name]) / min(times["ours_4task"]) for name in REFERENCES}}))
        return
    if args.variant == "surgery":
        best = run_surgery(folder, batch, args.steps, dtype, device)
        print(json.dumps({"variant": "surgery", **{f"{k}_step_s": v for k, v in best.items()}}))
        return
    if args.variant in REFERENCES:
        times = run_peft(folder, batch, args.steps, dtype, device, packed=args.variant == "peft_packed")
    else:
        times = run_ours(folder, batch, args.steps, 1 if args.variant == "ours_1task" else TASKS, dtype, device, args.variant)
    print(json.dumps({
        "variant": args.variant,
        "tokens": tokens,
        "step_s": min(times),
        "tokens_per_s": tokens / min(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_memory_bytes": peak_memory(device),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 measured steps of 8 rows x <=64 tokens, one round")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the variants; each keeps its fastest")
    parser.add_argument("--ablation", action="store_true", help="also the 4-task trainer without each speed-up")
    parser.add_argument("--interleaved", action="store_true", help="only the step times of the references and ours_4task, in one process, in turn")
    parser.add_argument("--variant", choices=VARIANTS + ABLATIONS + ("interleaved",), help=argparse.SUPPRESS)
    add_precision_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rows, args.length, args.rounds = 2, 8, 64, 1
    if args.interleaved:
        args.variant = "interleaved"
    if args.variant:
        child(args)
        return
    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for variant in VARIANTS + (ABLATIONS if args.ablation else ()):
            command = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps), "--rows",
                       str(args.rows), "--length", str(args.length), "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype]
            finished = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(finished.stdout.strip().splitlines()[-1])
            key = "plain_step_s" if variant == "surgery" else "step_s"
            if variant not in results or result[key] < results[variant][key]:
                results[variant] = result
    ours, surgery = results["ours_4task"], results["surgery"]
    # Ours against the stronger reference on each axis: the faster one's tokens/s, the leaner one's RSS.
    fastest = max(REFERENCES, key=lambda name: results[name]["tokens_per_s"])
    leanest = min(REFERENCES, key=lambda name: results[name]["peak_rss_mb"])
    peft, peft_lean = results[fastest], results[leanest]
    print(json.dumps({
        "model": f"SmolLM2-135M-Instruct (default), {args.device} {args.dtype} base, fp32 LoRA, r=16 all-linear",
        "batch": {"rows": args.rows, "max_length": args.length, "tokens": ours["tokens"], "tasks": TASKS,
                  "measured_steps": args.steps, "rounds": args.rounds, "threads": args.threads},
        "results": results,
        "stronger_reference": {"tokens_per_s": fastest, "peak_rss": leanest},
        "ratios": {
            "tokens_per_s_ours_4task_vs_peft": ours["tokens_per_s"] / peft["tokens_per_s"],
            "tokens_per_s_ours_4task_vs_each_reference": {name: ours["tokens_per_s"] / results[name]["tokens_per_s"] for name in REFERENCES},
            "tokens_per_s_ours_1task_vs_peft": results["ours_1task"]["tokens_per_s"] / peft["tokens_per_s"],
            "peak_rss_ours_4task_vs_peft": ours["peak_rss_mb"] / peft_lean["peak_rss_mb"],
            "peak_rss_ours_4task_vs_each_reference": {name: ours["peak_rss_mb"] / results[name]["peak_rss_mb"] for name in REFERENCES},
            "peak_device_memory_ours_4task_vs_peft": (ours["peak_device_memory_bytes"] / peft_lean["peak_device_memory_bytes"]
                                                      if peft_lean["peak_device_memory_bytes"] else None),
            "pcgrad_step_vs_plain_step": surgery["pcgrad_step_s"] / surgery["plain_step_s"],
            "pcgrad_T_backward_step_vs_plain_step": surgery["pcgrad_T_backward_step_s"] / surgery["plain_step_s"],
            "pcgrad_one_backward_speedup_vs_T_backward": surgery["pcgrad_T_backward_step_s"] / surgery["pcgrad_step_s"],
            **{f"tokens_per_s_{name}_vs_peft": results[name]["tokens_per_s"] / peft["tokens_per_s"] for name in ABLATIONS if name in results},
        },
        "aims": {"tokens_per_s_ours_4task_vs_peft": ">= 1.3", "peak_rss_ours_4task_vs_peft": "<= 0.8",
                 "pcgrad_step_vs_plain_step": "<= 1.25"},
    }, indent=2))


if __name__ == "__main__":
    main()
