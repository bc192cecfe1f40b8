"""The multi-task training run: setup, the step loop (log, evaluate, stop early, checkpoint),
and the artifacts at the end. Data flows one way: files -> examples -> task-tagged micro-batches
-> model -> per-task losses -> surgery -> AdamW -> PEFT adapters."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from adapters.config import LoraConfig
from adapters.peft_io import load_adapter
from backbone.atomic_folder import replace_folder, staging_folder
from backbone.model_source import load_pretrained, served_model_name
from training.batching import BatchPlanner, MicroBatch, collate, pack_by_length
from training.checkpoint import load_checkpoint, remove_stale_staging, save_checkpoint
from training.config import AdapterSettings, TrainConfig
from training.data import TaskData, load_task_file
from training.distributed import Distributed, SilentLog
from training.data_prep import PrepSettings
from training.device_setup import grad_scaler_for, model_precision, peak_memory_bytes, reset_peak_memory, training_precision
from training.export import export_adapters
from training.optim import build_optimizer, lr_multiplier, param_groups
from training.progress import Progress
from training.report import RunLog, write_plots
from training.sampling import TaskSampler, mixing_probabilities
from training.step import StepStats, evaluate_loss, train_step
from training.surgery import Surgery
from training.task_adapters import AdapterSource, TaskAdapters
from training.train_eval import evaluate_run

log = logging.getLogger(__name__)


def lora_config(settings: AdapterSettings, base_model: str) -> LoraConfig:
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        target_modules=settings.targets,
        use_rslora=settings.rslora,
        lora_dropout=settings.dropout,
        base_model_name_or_path=base_model,
    )


class MultiTaskTrainer:
    def __init__(self, config: TrainConfig, model=None, tokenizer=None, distributed: Distributed | None = None) -> None:
        """`model`/`tokenizer` may be passed in (tests, benchmarks); otherwise `config.model` is loaded.
        `distributed`: this process's rank under torchrun (default: a single process)."""
        self.config = config
        self.distributed = distributed or Distributed()
        self.output = Path(config.output_dir)
        if model is None:
            precision = training_precision(config.device, config.dtype)
            model, tokenizer = load_pretrained(config.model, dtype=precision.dtype, device=precision.device)
        self.model, self.tokenizer = model, tokenizer
        self.device, self.dtype = model_precision(model)
        self.scaler = grad_scaler_for(model)
        self.base_name = served_model_name(config.model) if config.model == "default" else config.model
        self.task_names = [t.name for t in config.tasks]
        torch.manual_seed(config.seed)
        self._load_data()
        self._build_adapters()
        self.step = 0
        self.best_eval: float | None = None
        self.evals_without_gain = 0
        self.stopped_early = False

    # ---- setup -------------------------------------------------------------------------------

    def _load_data(self) -> None:
        settings = self.config.data
        prep = None
        if settings.clean or settings.dedupe or settings.near_duplicate_threshold or settings.min_words or settings.max_words or settings.max_repetition:
            prep = PrepSettings(settings.clean, settings.dedupe, settings.near_duplicate_threshold,
                                settings.min_words, settings.max_words, settings.max_repetition)
        self.train_data: dict[str, TaskData] = {}
        self.eval_data: dict[str, TaskData] = {}
        for task in self.config.tasks:
            if task.train and not task.adapter.frozen:
                self.train_data[task.name] = load_task_file(
                    task.train, task.format, self.tokenizer, settings.max_length, settings.overlong, prep, task.negatives
                )
            if task.eval:
                self.eval_data[task.name] = load_task_file(task.eval, task.format, self.tokenizer, settings.max_length, settings.overlong)
        self.trainable_tasks = [i for i, t in enumerate(self.config.tasks) if t.name in self.train_data]

    def _source(self, name: str, settings: AdapterSettings) -> AdapterSource:
        if settings.init_from and self.output.resolve() in Path(settings.init_from).resolve().parents:
            raise ValueError(
                f"adapter {name!r} starts from {settings.init_from}, inside output_dir {self.output}, which this run "
                "rewrites; write the new run to another output_dir"
            )
        initial = load_adapter(settings.init_from, self.model.config) if settings.init_from else None
        return AdapterSource(name, lora_config(settings, self.base_name), initial, settings.frozen)

    def _build_adapters(self) -> None:
        config = self.config
        tasks = [self._source(t.name, t.adapter) for t in config.tasks]
        shared = self._source("shared", config.shared) if config.shared is not None else None
        self.adapters = TaskAdapters(self.model, tasks, shared, seed=config.seed)
        self.adapters.make_trainable()
        self.adapters.attach_task_grad_sinks()
        opt = config.optimizer
        groups = param_groups(
            self.adapters.named_parameters(), opt.lr, opt.weight_decay, self.model.config.num_hidden_layers, opt.layer_decay
        )
        self.optimizer = build_optimizer(groups, (opt.betas[0], opt.betas[1]), opt.eps)
        self.surgery = Surgery(config.surgery.method, len(tasks), config.seed, config.surgery.gradvac_beta, config.surgery.c)
        sizes = [len(self.train_data[self.task_names[i]].examples) for i in self.trainable_tasks]
        weights = [config.tasks[i].weight for i in self.trainable_tasks]
        s = config.sampling
        self.mix = mixing_probabilities(sizes, s.strategy, s.temperature, s.cap, weights)
        sampler = TaskSampler(sizes, self.mix, seed=config.seed)
        lengths = [[len(e) for e in self.train_data[self.task_names[i]].examples] for i in self.trainable_tasks]
        b = config.batching
        self.planner = BatchPlanner(sampler, lengths, b.batch_tokens, b.accumulation)
        self.eval_batches = self._eval_batches()

    def _eval_batches(self) -> dict[str, list[MicroBatch]]:
        out = {}
        for name, data in self.eval_data.items():
            task = self.task_names.index(name)
            examples = data.examples[: self.config.eval.max_examples]
            groups = pack_by_length([len(e) for e in examples], self.config.batching.batch_tokens)
            out[name] = [collate([(task, examples[i]) for i in group], self.pad_id) for group in groups]
        return out

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return 0 if pad is None else pad  # padding is never attended to nor labelled: any id works

    def micro_batches(self, plan: list[list[tuple[int, int]]]) -> list[MicroBatch]:
        """Planned (sampler task index, example index) rows -> micro-batches tagged with task ids."""
        batches = []
        for rows in plan:
            tagged = []
            for sampler_task, example in rows:
                task = self.trainable_tasks[sampler_task]
                tagged.append((task, self.train_data[self.task_names[task]].examples[example]))
            batches.append(collate(tagged, self.pad_id))
        return batches

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "adapters": {name: p.detach().clone() for name, p in self.adapters.named_parameters()},
            "optimizer": self.optimizer.state_dict(),
            "planner": self.planner.state_dict(),
            "surgery": self.surgery.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": list(random.getstate()[1]),
            "best_eval": self.best_eval,
            "evals_without_gain": self.evals_without_gain,
            "task_names": self.task_names,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["task_names"] != self.task_names:
            raise ValueError(
                f"the checkpoint was trained on tasks {state['task_names']}, the config lists {self.task_names}; "
                "resume with the config the checkpoint was made with"
            )
        params = dict(self.adapters.named_parameters())
        with torch.no_grad():
            for name, value in state["adapters"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.planner.load_state_dict(state["planner"])
        self.surgery.load_state_dict(state["surgery"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate((3, tuple(state["python_rng"]), None))
        self.step = state["step"]
        self.best_eval = state["best_eval"]
        self.evals_without_gain = state["evals_without_gain"]
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    # ---- the loop ----------------------------------------------------------------------------

    def train(self, resume: str | Path | bool | None = None) -> dict:
        config = self.config
        self.output.mkdir(parents=True, exist_ok=True)
        main = self.distributed.is_main
        if resume:
            if main:  # the rank that saves owns the folder's leftovers too
                remove_stale_staging(self.output)
            self.load_state_dict(load_checkpoint(self.output, None if resume is True else resume))
            log.info("resumed at step %d", self.step)
        run_log = RunLog(self.output / "log.jsonl", resume_step=self.step if resume else None) if main else SilentLog()
        if self.distributed.rank:  # other dropout masks than rank 0's, reproducibly
            torch.manual_seed(config.seed + 1_000_003 * self.distributed.rank + self.step)
        if not resume:
            run_log.write({"kind": "setup", "step": 0, "world_size": self.distributed.world_size, "tasks": self.task_names, "mix": dict(zip(
                [self.task_names[i] for i in self.trainable_tasks], self.mix)),
                "data": {n: d.report() for n, d in self.train_data.items()},
                "eval_data": {n: d.report() for n, d in self.eval_data.items()}})
        total = config.schedule.max_steps
        reset_peak_memory(self.device)
        log.info("training on %s in %s (LoRA weights and optimizer state float32)", self.device, _dtype_name(self.dtype))
        self.progress = Progress(total, self.step, config.progress and main, log_lines=main)
        while self.step < total and not self.stopped_early:
            self.progress.start_step()
            plan = self.planner.next_step()
            multiplier = lr_multiplier(self.step, total, config.schedule.warmup_steps, config.schedule.kind, config.schedule.min_lr_ratio)
            share = self.distributed.share_of_step(plan, self.planner.lengths, config.batching.batch_tokens)
            stats = train_step(self.model, self.adapters, self.optimizer, self.surgery, self.micro_batches(share), multiplier,
                               config.optimizer.clip_norm, self.scaler, self.distributed)
            self.step += 1
            if not math.isfinite(stats.loss):
                raise FloatingPointError(f"the loss became {stats.loss} at step {self.step}; lower optimizer.lr or set optimizer.clip_norm")
            pace = self.progress.end_step(stats.tokens, stats.loss)
            run_log.write({**self._step_record(stats, multiplier), **asdict(pace)})
            if config.eval.every and self.step % config.eval.every == 0:
                self._evaluate(run_log)
            if main and config.checkpoint.every and self.step % config.checkpoint.every == 0:
                save_checkpoint(self.output, self.step, self.state_dict(), config.checkpoint.keep)
        self.progress.close()
        if self.eval_batches and (not config.eval.every or self.step % config.eval.every):
            self._evaluate(run_log)
        self._export(self.output / "last")
        if self.best_eval is None:
            self._export(self.output / "best")
        summary = {"steps": self.step, "stopped_early": self.stopped_early, "best_eval_loss": self.best_eval,
                   "realised_mix": dict(zip([self.task_names[i] for i in self.trainable_tasks], self.planner.sampler.realised_mix())),
                   "device": str(self.device), "dtype": _dtype_name(self.dtype),
                   "peak_device_memory_bytes": peak_memory_bytes(self.device)}
        if main:
            _write_json(self.output / "summary.json", summary)
        if main and config.plots:
            write_plots(self.output / "log.jsonl", self.output / "plots", self.task_names)
        if config.eval.metrics:
            summary["eval_report"] = str(evaluate_run(config, self.output / "last", self.output / "eval"))
        return summary

    def _step_record(self, stats: StepStats, multiplier: float) -> dict:
        return {
            "kind": "train",
            "step": self.step,
            "loss": stats.loss,
            "task_loss": stats.task_loss,
            "task_tokens": stats.task_tokens,
            "tokens": stats.tokens,
            "lr": self.config.optimizer.lr * multiplier,
            "grad_norm": stats.grad_norm,
            "cosines": stats.cosines,
            "conflict_rate": stats.conflict_rate,
            "update_norms": {p.name: self.adapters.update_norm(p.slot) for p in self.adapters.plans},
            "realised_mix": self.planner.sampler.realised_mix(),
        }

    def _evaluate(self, run_log: RunLog) -> None:
        results = {}
        for name, batches in self.eval_batches.items():
            loss, tokens = evaluate_loss(self.model, self.adapters, batches)
            results[name] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
        if not results:
            return
        mean = sum(r["loss"] for r in results.values()) / len(results)
        improved = self.best_eval is None or mean < self.best_eval
        run_log.write({"kind": "eval", "step": self.step, "tasks": results, "mean_loss": mean, "improved": improved})
        self.progress.show_eval(mean, {name: r["loss"] for name, r in results.items()})
        if improved:
            self.best_eval, self.evals_without_gain = mean, 0
            self._export(self.output / "best")
        else:
            self.evals_without_gain += 1
            if self.config.eval.patience and self.evals_without_gain >= self.config.eval.patience:
                self.stopped_early = True
                log.info("early stop at step %d: no better mean eval loss in %d evaluations", self.step, self.evals_without_gain)

    def _export(self, folder: Path) -> None:
        """Every trained adapter as PEFT; frozen adapters are never rewritten (their files stay as they were)."""
        if not self.distributed.is_main:
            return
        trained = {p.name: self.adapters.weights(p.name) for p in self.adapters.plans[: self.adapters.num_tasks] if not p.frozen}
        shared = self.adapters.weights("shared") if self.adapters.shared_slot is not None else None
        staging = staging_folder(folder)
        try:
            export_adapters(staging, trained, shared, self.base_name, write_shared=self.adapters.trains_shared)
            replace_folder(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_json(path: Path, value: dict) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(staging, path)


def describe(config: TrainConfig) -> str:
    """The resolved config as JSON (for --dry-run)."""
    return json.dumps(asdict(config), indent=2)
