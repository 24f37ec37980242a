"""The training loop on a CUDA device: the same numbers as on the CPU (skipped without a GPU).

benchmarks/gpu_check.sh runs this file on a GPU machine; `make test` on a CPU skips it.
"""

import pytest
import torch

from lorakit.train.loop import train
from tests import tiny
from tests.train.test_loop import config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(tmp_path, device: str, **train_kw):
    from safetensors.torch import load_file

    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = config(tmp_path, max_steps=4, **train_kw)
    model = tiny.tiny_llama().to(device)
    result = train(cfg, model=model, tokenizer=tiny.tiny_tokenizer(), progress=False)
    return result, load_file(str(result.adapter_dir / "adapter_model.safetensors"))


@pytest.mark.parametrize("padding_free", [True, False])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cuda_fp32_training_matches_the_cpu(tmp_path, padding_free, attn):
    kw = dict(padding_free=padding_free, attn_implementation=attn, lora_compute="fp32")
    cpu, cpu_adapter = _run(tmp_path / "cpu", "cpu", **kw)
    gpu, gpu_adapter = _run(tmp_path / "cuda", "cuda", **kw)
    assert gpu.train_loss == pytest.approx(cpu.train_loss, rel=1e-3)
    for k in cpu_adapter:
        torch.testing.assert_close(gpu_adapter[k], cpu_adapter[k], rtol=1e-3, atol=1e-5, msg=k)


def test_cuda_bf16_training_with_checkpointing_learns(tmp_path):
    (tmp_path / "run").mkdir()
    cfg = config(tmp_path, max_steps=30, lr=1e-2, gradient_checkpointing=True)
    model = tiny.tiny_llama().to("cuda", torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    result = train(cfg, model=model, tokenizer=tiny.tiny_tokenizer(), progress=False)
    import json

    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "\"loss\"" in x]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    assert result.adapter_dir.exists()
