"""A checkpoint converted "for TP2 x PP2" loads at TP1, TP2, PP2 and TP2 x PP2 with the parameters
the model's own HF loader gives, bit for bit, and the same outputs; Megatron's own save at TP2 x PP2
(padded vocabulary) loads at TP1 and converts back to the original HF tensors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from megatron_vgpo.checkpoint.convert import hf_to_megatron, megatron_to_hf
from tests.checkpoint.test_conversion import assert_bit_exact, hf_tensors
from tests.conftest import run_torchrun

WORKER = Path(__file__).with_name("layout_worker.py")
LAYOUTS = ("tp2pp2", "tp1pp1", "tp2pp1", "tp1pp2")


@pytest.fixture(scope="module")
def layout_run(tiny_hf_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    pairs = []
    for kind, src in tiny_hf_dirs.items():
        meg = hf_to_megatron(src, root / f"megatron_{kind}", tp=2, pp=2, progress=False)
        pairs.append(f"{kind}={src}:{meg}")
    output = run_torchrun(WORKER, 4, "--out", root, *pairs, timeout=400)
    return root, output


@pytest.mark.distributed
@pytest.mark.slow
def test_every_layout_loads_the_same_parameters(layout_run):
    _, output = layout_run
    lines = re.findall(r"\[layout\] (\w+) (\w+) (tp\dpp\d): (\d+) of (\d+) parameters differ", output)
    seen = {(kind, source, layout) for kind, source, layout, _, _ in lines}
    expected = {(k, "converted", lay) for k in ("untied", "tied") for lay in LAYOUTS}
    expected |= {(k, "megatron_saved", "tp1pp1") for k in ("untied", "tied")}
    assert seen == expected, output[-3000:]
    assert all(bad == "0" and int(total) > 0 for *_, bad, total in lines), output[-3000:]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_every_layout_gives_the_same_outputs(layout_run, tiny_hf_dirs, kind):
    from transformers import AutoConfig

    from megatron_vgpo.models.qwen2_5_vl.parity import compare, fixed_multimodal_batch, micro_batches

    root, _ = layout_run
    batches = micro_batches(fixed_multimodal_batch(AutoConfig.from_pretrained(tiny_hf_dirs[kind])))
    reference = torch.load(root / f"out_{kind}_tp1pp1.pt")
    for layout in LAYOUTS[::2] + LAYOUTS[3:]:
        outputs = torch.load(root / f"out_{kind}_{layout}.pt")
        for batch, out, ref in zip(batches, outputs, reference, strict=True):
            diffs = compare(batch, *out, *ref)
            assert max(diffs.values()) < 1e-5, (layout, diffs)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_megatron_saved_checkpoint_converts_back_bit_exact(layout_run, tiny_hf_dirs, tmp_path, kind):
    root, _ = layout_run
    saved = root / f"megatron_saved_{kind}"
    back = megatron_to_hf(saved, tmp_path / "hf", hf_config_dir=tiny_hf_dirs[kind], progress=False)
    assert_bit_exact(hf_tensors(tiny_hf_dirs[kind]), hf_tensors(back))
