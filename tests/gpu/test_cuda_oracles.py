"""The CPU suite's oracles on CUDA: backbone = transformers (fp32 at 1e-4, bf16 within bf16's own
error), adapters = PEFT, mixed batch = single-adapter runs, one-backward per-task gradients = T
backwards, a hot swap under load, the memory budget, and a bf16 training step."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from adapter_fixtures import peft_adapter
from engine_fixtures import reference_completion, save_random_adapter, save_tiny_model_with_tokenizer
from tiny_models import load_reference, save_tiny_model

from adapters.injection import inject_lora
from adapters.peft_io import load_adapter
from adapters.routing import AdapterRouting
from adapters.weights import write_to_slot
from backbone import ModelConfig, load_model
from backbone.sampling import SamplingParams
from backbone.tokenizer import Tokenizer
from server.device_memory import DeviceMemoryError
from server.engine import Engine, EngineConfig, GenerationRequest

CUDA = torch.device("cuda", 0)


def _prompt(seed: int, length: int) -> list[int]:
    return [3 + (seed * 37 + i * 11) % 120 for i in range(length)]


def _wait_until(condition, what: str) -> None:
    for _ in range(4000):
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("gpu_model"))


@pytest.fixture(scope="module")
def adapter_dirs(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_adapters")
    return {name: save_random_adapter(root / name, model_dir, seed=seed) for seed, name in enumerate(["a", "b", "c"], 1)}


def test_weights_load_onto_the_device_in_the_dtype(tiny_llama_dir):
    torch.cuda.reset_peak_memory_stats(CUDA)
    model = load_model(tiny_llama_dir, dtype=torch.bfloat16, device=CUDA)
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.inv_freq.dtype == torch.float32 and model.inv_freq.device.type == "cuda"
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # Never a full fp32 copy on the device: the peak stays near the bf16 weights themselves.
    assert torch.cuda.max_memory_allocated(CUDA) < 1.5 * weight_bytes + 2**20


def test_fp32_logits_match_transformers_on_cuda(tiny_llama_dir):
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0)).to(CUDA)
    reference = load_reference(tiny_llama_dir).to(CUDA)
    with torch.no_grad():
        expected = reference(ids).logits
        ours = load_model(tiny_llama_dir, device=CUDA)(ids)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_bf16_logits_match_transformers_bf16_within_bf16_error(tiny_llama_dir):
    import transformers

    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0)).to(CUDA)
    with torch.no_grad():
        exact = load_reference(tiny_llama_dir).to(CUDA)(ids).logits
        hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.bfloat16).to(CUDA).eval()
        reference = hf_bf16(ids).logits.float()
        ours = load_model(tiny_llama_dir, dtype=torch.bfloat16, device=CUDA)(ids).float()
    bf16_error = (reference - exact).abs().max().item()
    assert 0 < bf16_error
    assert (ours - reference).abs().max().item() <= 2 * bf16_error


def test_peft_adapter_matches_peft_on_cuda_fp32_and_bf16(tiny_llama_dir, tmp_path):
    import peft
    import transformers

    peft_model = peft_adapter(tiny_llama_dir, tmp_path / "adapter", r=8, lora_alpha=16, target_modules="all-linear").to(CUDA)
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(1)).to(CUDA)
    config = ModelConfig.from_folder(tiny_llama_dir)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(tiny_llama_dir, dtype=dtype, device=CUDA)
        layers = inject_lora(model, model.linear_modules(), num_slots=2, max_rank=8)
        write_to_slot(layers, 1, load_adapter(tmp_path / "adapter", config))
        with torch.no_grad():
            results[dtype] = model(ids, routing=AdapterRouting(torch.ones(3, dtype=torch.long, device=CUDA))).float()
    base_bf16 = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.bfloat16).to(CUDA).eval()
    peft_bf16 = peft.PeftModel.from_pretrained(base_bf16, tmp_path / "adapter").eval()
    with torch.no_grad():
        exact = peft_model(ids).logits
        reference_bf16 = peft_bf16(ids).logits.float()
    torch.testing.assert_close(results[torch.float32], exact, atol=1e-5, rtol=1e-5)
    bf16_error = (reference_bf16 - exact).abs().max().item()
    assert (results[torch.bfloat16] - reference_bf16).abs().max().item() <= 2 * bf16_error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_mixed_batch_matches_single_adapter_runs_on_cuda(model_dir, adapter_dirs, dtype):
    # 3 adapters over 2 slots: slot writes (async, on the side stream) happen while other rows decode.
    engine = Engine(load_model(model_dir, dtype=dtype, device=CUDA), Tokenizer.from_folder(model_dir),
                    EngineConfig(max_running=4, max_loras=2, max_lora_rank=8, prefill_chunk=8, max_context=128), "tiny")
    assert engine._pool.cache.keys[0].device.type == CUDA.type and engine._pool.cache.keys[0].dtype == dtype
    for name, path in adapter_dirs.items():
        engine.register_adapter(name, path)
    weights = engine.tiers.cpu.get(engine.tiers.registry.current("a").key)
    assert all(a.is_pinned() and a.dtype == dtype for a, _ in weights.tensors.values())
    engine.start()
    plan = [(None, 5), ("a", 19), ("b", 3), ("a", 7), ("c", 12), (None, 25), ("c", 4), ("b", 9), ("a", 2)]
    params = SamplingParams(max_tokens=12)
    try:
        handles = [engine.submit(GenerationRequest(_prompt(i, n), params, adapter=a)) for i, (a, n) in enumerate(plan)]
        results = [handle.result(timeout=120) for handle in handles]
    finally:
        engine.shutdown()
    for index, ((adapter, length), result) in enumerate(zip(plan, results)):
        expected = reference_completion(model_dir, adapter_dirs.get(adapter), _prompt(index, length), params, dtype, CUDA)
        assert result.token_ids == expected, f"request {index} on {adapter or 'base'}"


def test_hot_swap_under_load_on_cuda(model_dir, adapter_dirs):
    versions = {str(adapter_dirs["a"]): adapter_dirs["a"], str(adapter_dirs["b"]): adapter_dirs["b"]}
    prompts = [_prompt(seed, 4 + seed) for seed in range(3)]
    params = SamplingParams(max_tokens=8)
    expected = {(path, i): reference_completion(model_dir, versions[path], p, params, torch.bfloat16, CUDA)
                for path in versions for i, p in enumerate(prompts)}
    engine = Engine(load_model(model_dir, dtype=torch.bfloat16, device=CUDA), Tokenizer.from_folder(model_dir),
                    EngineConfig(max_running=4, max_loras=2, max_lora_rank=8, prefill_chunk=8, max_context=128), "tiny")
    engine.register_adapter("x", adapter_dirs["a"])
    engine.start()
    handles, errors, stop = [], [], threading.Event()

    def client(worker: int) -> None:
        count = 0
        while not stop.is_set() or count < 3:
            index = (worker + count) % len(prompts)
            try:
                handle = engine.submit(GenerationRequest(prompts[index], params, adapter="x"))
                handles.append((index, handle, handle.result(timeout=60)))
            except Exception as err:
                errors.append(err)
                return
            count += 1

    clients = [threading.Thread(target=client, args=(w,)) for w in range(3)]
    for thread in clients:
        thread.start()
    try:
        for swap in range(4):
            _wait_until(lambda: engine.stats().running > 0, "requests in flight")
            version = engine.register_adapter("x", adapter_dirs["b" if swap % 2 == 0 else "a"]).version
            _wait_until(lambda: any(h.adapter.version == version for _, h, _ in list(handles)), f"x@{version} served")
        stop.set()
        for thread in clients:
            thread.join(timeout=120)
    finally:
        engine.shutdown()
    assert not errors
    assert {handle.adapter.version for _, handle, _ in handles} == set(range(1, 6))
    for index, handle, result in handles:
        assert result.token_ids == expected[(handle.adapter.path, index)], f"x@{handle.adapter.version}"


def test_a_configuration_that_does_not_fit_fails_at_start(model_dir):
    model = load_model(model_dir, dtype=torch.bfloat16, device=CUDA)
    _, total = torch.cuda.mem_get_info(CUDA)
    # The tiny model's KV cache costs 2 layers x (K, V) x 2 heads x 16 dims x 2 bytes = 256 bytes per
    # row and position, over 248 + 256 (prefill chunk) positions: this many rows need ~2x the device.
    too_many_rows = int(total / (256 * 256)) + 1
    with pytest.raises(DeviceMemoryError, match="lower --max-running"):
        Engine(model, Tokenizer.from_folder(model_dir),
               EngineConfig(max_running=too_many_rows, max_loras=2, max_lora_rank=8, max_context=248), "tiny")


def test_per_task_gradients_from_one_backward_equal_t_backwards_on_cuda(tmp_path):
    from training.step import token_losses
    from training_toy import mixed_batch, tiny_adapters

    folder = save_tiny_model(tmp_path / "toy", initializer_range=0.2)
    model, adapters = tiny_adapters(folder, num_tasks=3, shared=True, random_b=True)
    model.to(CUDA)  # the LoRA layers and their fp32 parameters are submodules: they move with it
    adapters.attach_task_grad_sinks()
    batch = mixed_batch(3, rows_per_task=2)
    shared = adapters.slot_parameters(adapters.shared_slot)
    total = batch.num_answer_tokens
    token_losses(model, adapters, batch).sum().div(total).backward()
    binned = adapters.shared_task_grads().clone()
    for layer in adapters.layers.values():
        layer.task_grads = None
    for task in range(3):
        for p in shared:
            p.grad = None
        losses = token_losses(model, adapters, batch)
        (losses[batch.task_ids.to(CUDA) == task].sum() / total).backward()
        separate = torch.cat([p.grad.reshape(-1) for p in shared])
        assert separate.abs().max() > 0
        torch.testing.assert_close(binned[task], separate, atol=1e-6, rtol=1e-5)


def test_bf16_training_step_on_cuda_keeps_fp32_state_and_learns(tmp_path):
    from training.optim import build_optimizer, param_groups
    from training.step import train_step
    from training.surgery import Surgery
    from training_toy import mixed_batch, tiny_adapters

    folder = save_tiny_model(tmp_path / "toy", initializer_range=0.2)
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, adapters = tiny_adapters(folder, num_tasks=2, shared=True, dtype=dtype)
        model.to(CUDA)  # the base (in `dtype`) and the fp32 LoRA parameters move together
        adapters.attach_task_grad_sinks()
        optimizer = build_optimizer(param_groups(adapters.named_parameters(), 1e-2, 0.0, 2), (0.9, 0.999), 1e-8)
        batch = mixed_batch(2, rows_per_task=3)
        losses[dtype] = [train_step(model, adapters, optimizer, Surgery("pcgrad", 2, 0), [batch], 1.0, 1.0).loss for _ in range(15)]
        assert all(p.dtype == torch.float32 and p.device.type == CUDA.type for _, p in adapters.named_parameters())
    drop = {d: values[0] - values[-1] for d, values in losses.items()}
    assert drop[torch.float32] > 0.3 * losses[torch.float32][0]
    assert drop[torch.bfloat16] == pytest.approx(drop[torch.float32], rel=0.15)
