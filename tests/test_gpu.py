"""CUDA and CPU run the same code path: same adapter, same numbers (skipped without CUDA)."""

import pytest
import torch

import edgepeft as ep


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_cuda_matches_cpu(tiny_dir, input_ids, quant):
    folder = tiny_dir("llama")
    cpu, _ = ep.load_base(folder, quant=quant, device="cpu", compute_dtype=torch.float32)
    gpu, _ = ep.load_base(folder, quant=quant, device="cuda", compute_dtype=torch.float32)
    assert ep.fingerprint(cpu) == ep.fingerprint(gpu)
    torch.manual_seed(0)
    ep.add_adapter(cpu, ep.LoraConfig(r=4, init="random"), name="a")
    torch.manual_seed(0)
    ep.add_adapter(gpu, ep.LoraConfig(r=4, init="random"), name="a")
    with torch.no_grad():
        y_cpu = cpu(input_ids).logits
        y_gpu = gpu(input_ids.cuda()).logits.cpu()
    # Kernels differ between devices (int8 more so): a loose bound catches a wrong path.
    assert (y_cpu - y_gpu).abs().max() < (5e-3 if quant == "nf4" else 5e-2)
