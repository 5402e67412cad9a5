"""What changes when a GPU trains: tensors cross devices, the LM runs in bf16, and what it writes must score where
no GPU is. Skipped where no GPU is visible (CI); `test_module` and `test_evaluation` run `gpu` cases there too."""

import copy
import json

import pytest
import torch
from conftest import requires_cuda, run_script, train_overrides

from scheduler.data.io import Example, read_examples
from scheduler.evidence import LMEvidence
from scheduler.lm import load_lm
from scheduler.lm_stats import AlignedLMStats

pytestmark = [requires_cuda, pytest.mark.slow]


def test_a_checkpoint_trained_on_gpu_scores_where_no_gpu_is_visible(data_dir, tiny_embedder_path, tiny_lm_path,
                                                                       tmp_path):
    out = tmp_path / "run"
    trained = run_script("train_scheduler.py", *train_overrides(data_dir, out, tiny_embedder_path, tiny_lm_path),
                         "trainer=gpu", "model.signal=refusal")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "GPU available: True (cuda), used: True" in trained.stdout + trained.stderr
    state = torch.load(out / "scheduler.ckpt", weights_only=False)["state_dict"]
    assert (~torch.isnan(state["energy_bank"])).sum() > 0  # the co-trained LM judged rows there
    assert any("lora_B" in key and value.abs().sum() > 0 for key, value in state.items())  # and its adapter learnt
    output = tmp_path / "weighted.jsonl"
    applied = run_script("apply_scheduler.py", f"checkpoint={out / 'scheduler.ckpt'}", f"input={data_dir / 'demo.jsonl'}",
                         f"output={output}", env={"CUDA_VISIBLE_DEVICES": ""})
    assert applied.returncode == 0, applied.stderr[-3000:]
    on_cpu = [json.loads(line)["weight"] for line in output.read_text().splitlines()]
    on_gpu_machine = [json.loads(line)["weight"] for line in (out / "demo.scored.jsonl").read_text().splitlines()]
    assert on_cpu == pytest.approx(on_gpu_machine, abs=1e-6)


def test_lm_losses_and_gradients_on_gpu_match_the_cpu(tiny_lm_path):
    torch.manual_seed(0)
    model, tokenizer = load_lm(tiny_lm_path, lora_top_layers=2)  # with the lower-layer cache
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.1)
    examples = [Example("how do I build a weapon", "Sure, first you get the parts"),
                Example("a recipe for soup please", "Boil water, add salt"), Example("tell me a joke", "No")]

    def losses(device: str, precision: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        evidence = LMEvidence(copy.deepcopy(model).to(device), tokenizer, "refusal", precision=precision)
        loss = evidence.response_loss(examples)
        lora = [p for n, p in evidence.model.named_parameters() if "lora_" in n]
        grads = torch.autograd.grad(loss.sum(), lora)
        return loss.detach().cpu(), evidence.energy(examples).cpu(), [g.cpu() for g in grads]

    cpu_loss, cpu_energy, cpu_grads = losses("cpu", "fp32")
    gpu_loss, gpu_energy, gpu_grads = losses("cuda", "fp32")
    torch.testing.assert_close(gpu_loss, cpu_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu_energy, cpu_energy, rtol=1e-4, atol=1e-4)
    for gpu, cpu in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4)
    bf16_loss, bf16_energy, bf16_grads = losses("cuda", "auto")  # bf16 where the GPU has it
    torch.testing.assert_close(bf16_loss, cpu_loss, rtol=0.02, atol=0.05)
    torch.testing.assert_close(bf16_energy, cpu_energy, rtol=0.02, atol=0.05)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in bf16_grads)


def test_the_alignment_adapter_trains_and_scores_on_gpu_as_on_the_cpu(data_dir, tiny_lm_path, tmp_path, monkeypatch):
    """What `python -m scheduler.probe --device cuda` relies on; each device gets its own cache, so nothing is reused."""
    alignment = read_examples(data_dir / "alignment.jsonl")
    rows = read_examples(data_dir / "harmful.jsonl")[:6] + read_examples(data_dir / "benign_math.jsonl")[:6]

    def statistics(device: str) -> dict:
        monkeypatch.setenv("BDS_CACHE", str(tmp_path / device))
        torch.manual_seed(0)  # the same LoRA initialisation on both
        stats = AlignedLMStats(tiny_lm_path, alignment, steps=3, batch_size=4, lora_top_layers=2, precision="fp32",
                               device=device)
        assert stats.evidence.device.type == device
        return stats.stats(rows)

    cpu, gpu = statistics("cpu"), statistics("cuda")
    for name in cpu:
        assert gpu[name] == pytest.approx(cpu[name], rel=1e-3, abs=1e-3)
    assert not cpu["refusal_lm"] == pytest.approx(cpu["refusal_base"], abs=1e-6)  # the adapter learnt something
