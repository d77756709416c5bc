"""Tests for the visual-attention analysis (``megatron_vgpo.analysis``).

The math on hand-made tensors (every expected value computed in the comments); the extraction on the
project's tiny random checkpoint (two decoder layers) with synthetic images: the focus score it
reports is ``visual_focus_scores`` on HF's ``hidden_states[-1]``, its image attention is HF's
``attentions[-1]``; and the CLI end to end on a 4-row evaluation JSONL and on a 2-row dataset.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from megatron_vgpo.algorithms.vgpo import visual_focus_scores
from megatron_vgpo.analysis.metrics import (
    GENERATED, IMAGE, OTHER, QUESTION, attention_late_early_ratio, attention_shares, binned_means,
    focus_late_early_ratio, pearson_r, renormalised_shares,
)
from megatron_vgpo.analysis.trace import FinalLayerAttention

REPO = Path(__file__).resolve().parents[2]
nan = float("nan")

# ------------------------------------------------------------------------------- the toy case

# Positions: 0 system ("other"), 1-2 image, 3 question, 4-5 the response.
TOY_CLASSES = torch.tensor([OTHER, IMAGE, IMAGE, QUESTION, GENERATED, GENERATED])
TOY_RESPONSE = TOY_CLASSES == GENERATED


def _toy_final_layer() -> torch.Tensor:
    """[1, 2 heads, 6, 6] causal attention; only the response rows 4 and 5 matter:
    head 0 row 4 [.1 .2 .3 .2 .2 0],  row 5 [0  .1 .1 .4 .2 .2]
    head 1 row 4 [.3 .1 .1 .4 .1 0],  row 5 [.2 .2 .2 .2 .1 .1]
    head mean row 4 [.2 .15 .2 .3 .15 0] -> image .35, question .3, generated .15, other .2
    head mean row 5 [.1 .15 .15 .3 .15 .15] -> image .3, question .3, generated .3, other .1"""
    w = torch.tril(torch.ones(6, 6))
    w = (w / w.sum(-1, keepdim=True)).repeat(2, 1, 1)  # other rows: uniform causal
    w[0, 4] = torch.tensor([.1, .2, .3, .2, .2, 0])
    w[0, 5] = torch.tensor([0, .1, .1, .4, .2, .2])
    w[1, 4] = torch.tensor([.3, .1, .1, .4, .1, 0])
    w[1, 5] = torch.tensor([.2, .2, .2, .2, .1, .1])
    return w.unsqueeze(0)


class _ToyAttention(torch.nn.Module):
    """Returns (output, weights) like HF's eager attention, with fixed weights."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.weights = weights

    def forward(self, x):
        return x, self.weights


class _ToyLayer(torch.nn.Module):
    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.self_attn = _ToyAttention(weights)

    def forward(self, x):
        return self.self_attn(x)[0]


def test_two_layer_toy_shares_equal_the_hand_computation():
    # Layer 0 puts everything on the image; the analysis must read layer 1 (the final one).
    first = torch.zeros(1, 2, 6, 6)
    first[..., 1] = 1.0
    layers = torch.nn.ModuleList([_ToyLayer(first), _ToyLayer(_toy_final_layer())])
    with FinalLayerAttention(layers) as recorder:
        x = torch.zeros(1, 6, 4)
        for layer in layers:
            x = layer(x)
    raw = attention_shares(recorder.weights, TOY_CLASSES[None], TOY_RESPONSE[None])[0]
    expected = torch.tensor([[.35, .3, .15, .2], [.3, .3, .3, .1]])  # (image, question, generated, other)
    torch.testing.assert_close(raw[4:], expected)
    assert raw[:4].abs().sum() == 0  # prompt rows are not reported
    torch.testing.assert_close(raw[4:].sum(-1), torch.ones(2))
    # the same from the [B, H, L, L] form (heads averaged inside)
    torch.testing.assert_close(attention_shares(_toy_final_layer(), TOY_CLASSES[None], TOY_RESPONSE[None])[0], raw)
    # renormalised over image + question + generated: row 4 / .8, row 5 / .9
    three = renormalised_shares(raw[4:])
    torch.testing.assert_close(three, torch.tensor([[.4375, .375, .1875], [1 / 3, 1 / 3, 1 / 3]]))
    torch.testing.assert_close(three.sum(-1), torch.ones(2))


def test_attention_late_early_ratio_by_hand():
    # row 0, T = 5: early = first 2 -> .4 + .2 = .6; late -> .1 + .1 + .2 = .4; ratio 2/3.
    # row 1, T = 4 (+ padding): early .1 + .3 = .4, late .2 + .2 = .4 -> 1. row 2, T = 1 -> NaN.
    share = torch.tensor([[.4, .2, .1, .1, .2], [.1, .3, .2, .2, .9], [.5, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(attention_late_early_ratio(share, mask), torch.tensor([2 / 3, 1.0, nan]),
                               equal_nan=True)


def test_focus_late_early_ratio_by_hand():
    # row 0, T = 6, k = floor(2.4) = 2, threshold .8 -> marks t = 1, 2; early = first 3:
    #   f_early = 2/6, f_late = 0.
    # row 1, T = 5, k = 2, sorted [.5 .5 .5 .2 .1] -> threshold .5, ties pass -> marks t = 2, 3, 4;
    #   early = first 2 -> 1/5, late 2/5.
    # row 2 has no token and is left out. ratio = mean(0, 2/5) / mean(1/3, 1/5) = (1/5) / (4/15) = 0.75
    rho = torch.tensor([[.9, .8, .1, .2, .3, .7], [.2, .5, .5, .5, .1, .0], [.9, .9, .9, .9, .9, .9]])
    mask = torch.tensor([[1] * 6, [1] * 5 + [0], [0] * 6], dtype=torch.bool)
    assert focus_late_early_ratio(rho, mask) == pytest.approx(0.75, rel=1e-6)
    assert math.isnan(focus_late_early_ratio(rho, torch.zeros_like(mask)))


def test_pearson_r_by_hand():
    # row 0: dx = [-1, 0, 1], dy = [-1, 1, 0] -> cov 1, var 2 and 2 -> r = 1/2.
    # row 1: y = 2x on the 3 masked positions (the padded one is far off) -> 1.
    # row 2: constant y -> NaN; row 3: one position -> NaN.
    x = torch.tensor([[1., 2, 3, 0], [1, 2, 3, 100], [1, 2, 3, 4], [1, 2, 3, 4]])
    y = torch.tensor([[1., 3, 2, 0], [2, 4, 6, -5], [5, 5, 5, 5], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(pearson_r(x, y, mask), torch.tensor([0.5, 1.0, nan, nan], dtype=torch.float64),
                               equal_nan=True)


def test_binned_means_by_hand():
    # row 0, T = 4, 2 bins: t = 1..4 -> bins floor((t - 1) 2 / 4) = 0, 0, 1, 1 -> [1.5, 3.5].
    # with 4 bins, row 1, T = 3: bins floor((t - 1) 4 / 3) = 0, 1, 2; bin 3 is empty (NaN).
    values = torch.tensor([[1., 2, 3, 4], [10, 20, 30, 99]]).unsqueeze(-1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    torch.testing.assert_close(binned_means(values, mask, 2)[0, :, 0], torch.tensor([1.5, 3.5], dtype=torch.float64))
    torch.testing.assert_close(binned_means(values, mask, 4)[1, :, 0],
                               torch.tensor([10, 20, 30, nan], dtype=torch.float64), equal_nan=True)


# ----------------------------------------------------------------------- on the tiny checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, processor, model, data dir with 4 synthetic 112 x 112 PNGs and their rows)."""
    from megatron_vgpo.analysis.trace import load_model
    from megatron_vgpo.data.synthetic import SyntheticOptions, make_rows
    from megatron_vgpo.models.qwen2_5_vl.tiny import TinyOptions, load_processor, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("analysis")
    path = write_tiny_checkpoint(root / "tiny", TinyOptions(seed=0, init_std=0.1,
                                                            overrides={"text_config.num_hidden_layers": 2}))
    rows = make_rows(4, 0, "val", SyntheticOptions(size=112))
    for i, row in enumerate(rows):
        Image.open(io.BytesIO(row["images"][0]["bytes"])).save(root / f"img{i}.png")
    return path, load_processor(path), load_model(str(path), torch.device("cpu"), torch.float32), root, rows


def _item(processor, row, image: Image.Image, response: str):
    from megatron_vgpo.analysis.trace import Item
    from megatron_vgpo.data.prompt import render_prompt

    ids = processor.tokenizer(response, add_special_tokens=False)["input_ids"]
    return Item(id="x", benchmark="b", prompt_text=render_prompt(processor, row["problem"]), images=[image],
                response_ids=ids, correct=True)


def test_focus_score_and_attention_equal_hf_outputs_on_the_tiny_model(tiny):
    from megatron_vgpo.analysis.trace import encode, trace_response

    _, processor, model, root, rows = tiny
    item = _item(processor, rows[0], Image.open(root / "img0.png").convert("RGB"),
                 "<think> I count the red circles. </think> \\boxed{2}")
    trace = trace_response(model, processor, item)
    T = len(item.response_ids)
    assert trace.length == T and trace.rho.shape == (T,)

    inputs, prompt_length = encode(processor, item, torch.device("cpu"))
    with torch.no_grad():
        out = model(**inputs, use_cache=False, output_hidden_states=True, output_attentions=True)
    ids = inputs["input_ids"]
    response = torch.arange(ids.shape[1]).unsqueeze(0) >= prompt_length
    image = ids == model.config.image_token_id
    assert int(image.sum()) == 16  # 112 x 112 px = 4 x 4 merged tokens
    rho = visual_focus_scores(out.hidden_states[-1], image, response)[0, prompt_length:]
    torch.testing.assert_close(trace.rho, rho, rtol=0, atol=1e-6)
    final = out.attentions[-1].float().mean(1)[0, prompt_length:]  # [T, L], heads averaged
    torch.testing.assert_close(trace.shares[:, IMAGE], final[:, image[0]].sum(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(trace.shares.sum(-1), torch.ones(T), rtol=0, atol=1e-5)
    torch.testing.assert_close(renormalised_shares(trace.shares).sum(-1), torch.ones(T), rtol=0, atol=1e-5)


def test_position_classes_follow_the_chat_template(tiny):
    from megatron_vgpo.analysis.trace import encode, position_classes

    _, processor, model, root, rows = tiny
    item = _item(processor, rows[1], Image.open(root / "img1.png").convert("RGB"), "Three.")
    inputs, prompt_length = encode(processor, item, torch.device("cpu"))
    ids = inputs["input_ids"][0]
    classes = position_classes(ids, prompt_length, processor.tokenizer, model.config.image_token_id)
    decode = lambda c: processor.tokenizer.decode(ids[classes == c])  # noqa: E731
    assert int((classes == IMAGE).sum()) == 16
    assert decode(QUESTION) == rows[1]["problem"].replace("<image>", "") + "\n\n" + (
        "You first think through the reasoning process as an internal monologue, enclosed within <think> </think> "
        "tags. Then, provide your final answer enclosed within \\boxed{}.")
    assert decode(GENERATED) == "Three."
    other = decode(OTHER)
    assert "You are a helpful assistant." in other and "<|vision_start|>" in other and "assistant" in other


def _write_evaluation(folder: Path, root: Path, rows, processor) -> Path:
    """An evaluation output in ``folder``: ``items.jsonl`` (rows in every accepted form), ``run.json``
    with its pixel bounds and ``prepared/syn.jsonl``, laid out as ``megatron_vgpo.evaluate`` writes them
    (``evaluation/store.py``, ``evaluation/formats.py``). The rows: r0 a raw problem; syn:1 the
    evaluation's own form (templated prompt, here with EXPANDED pads, no ``images``: they come from
    row 1 of the prepared file); r2 a raw problem without <image> and an absolute image path; r3
    without ``correct`` (graded here from its label); "bad" skipped (a vision token in its response)."""
    from megatron_vgpo.data.prompt import render_prompt

    for i in range(4):
        shutil.copy(root / f"img{i}.png", folder / f"img{i}.png")
    (folder / "prepared").mkdir()
    (folder / "prepared" / "syn.jsonl").write_text("".join(
        json.dumps({"problem": r["problem"], "answer": r["answer"], "images": [str(folder / f"img{i}.png")]}) + "\n"
        for i, r in enumerate(rows[:2])))
    (folder / "run.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 50176}))
    good = "<think> There are red circles. Counting them gives the total. </think> \\boxed{%s}"
    templated = render_prompt(processor, rows[1]["problem"]).replace("<|image_pad|>", "<|image_pad|>" * 16)
    lines = [
        {"id": "r0", "benchmark": "syn", "prompt": rows[0]["problem"], "images": ["img0.png"],
         "response": good % rows[0]["answer"], "label": rows[0]["answer"], "correct": True},
        {"id": "syn:1", "benchmark": "syn", "sample": 0, "prompt": templated,
         "response": "<think> No idea. </think> \\boxed{9}", "label": rows[1]["answer"], "correct": False},
        {"id": "r2", "benchmark": "syn", "problem": rows[2]["problem"].replace("<image>", ""),
         "images": [str(folder / "img2.png")], "response": "\\boxed{9} I guess", "correct": False},
        {"id": "r3", "benchmark": "syn", "prompt": rows[3]["problem"], "images": ["img3.png"],
         "response": good % rows[3]["answer"], "label": rows[3]["answer"]},
        {"id": "bad", "prompt": rows[0]["problem"], "images": ["img0.png"], "response": "<|image_pad|>",
         "correct": True},
    ]
    path = folder / "items.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def test_cli_end_to_end_on_an_evaluation_jsonl(tiny, tmp_path):
    from megatron_vgpo.analysis.attention import main

    model_dir, processor, _, root, rows = tiny
    data = _write_evaluation(tmp_path, root, rows, processor)
    out = tmp_path / "analysis"
    summary = main(["--model", str(model_dir), "--data", str(data), "--output", str(out), "--bins", "5"])
    doc = json.loads((out / "attention.json").read_text())
    assert doc["summary"] == summary
    assert (doc["config"]["min_pixels"], doc["config"]["max_pixels"]) == (3136, 50176)  # from run.json
    assert [r["id"] for r in doc["responses"]] == ["r0", "syn:1", "r2", "r3"]  # "bad" skipped
    assert [r["correct"] for r in doc["responses"]] == [True, False, False, True]  # r3 graded from its label
    assert (summary["n_responses"], summary["correct"]["n"], summary["incorrect"]["n"]) == (4, 2, 2)
    for r in doc["responses"]:
        T = r["T"]
        assert all(len(v) == T for v in [*r["shares"].values(), *r["raw_shares"].values(), r["rho"]])
        for t in range(T):
            assert sum(r["shares"][k][t] for k in r["shares"]) == pytest.approx(1, abs=1e-4)
            assert sum(r["raw_shares"][k][t] for k in r["raw_shares"]) == pytest.approx(1, abs=1e-4)
        assert -1 <= r["pearson_r"] <= 1 and r["attention_late_early_ratio"] > 0
    for group in ("all", "correct", "incorrect"):
        g = summary[group]
        assert all(len(g["binned"][k]) == 5 for k in ("image", "question", "generated", "other"))
        assert g["focus_late_early_ratio"] is not None and g["pearson_r"]["n"] == g["n"]
        three = sum(g["mean_shares"][k] for k in ("image", "question", "generated"))
        assert three == pytest.approx(1, abs=1e-4)
    for png in ("attention_shares.png", "late_early_ratio.png", "focus_vs_attention.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_generates_and_grades_from_a_dataset(tiny, tmp_path):
    from megatron_vgpo.analysis.attention import main
    from megatron_vgpo.data.synthetic import write_parquet

    model_dir, _, _, _, rows = tiny
    write_parquet(rows[:2], tmp_path / "val.parquet")
    summary = main(["--model", str(model_dir), "--data", str(tmp_path / "val.parquet"), "--output",
                    str(tmp_path / "out"), "--max-new-tokens", "6", "--min-pixels", "3136", "--max-pixels", "50176",
                    "--no-figures"])
    doc = json.loads((tmp_path / "out" / "attention.json").read_text())
    assert summary["n_responses"] == 2 and [r["id"] for r in doc["responses"]] == ["val:0", "val:1"]
    assert all(1 <= r["T"] <= 6 and isinstance(r["correct"], bool) for r in doc["responses"])
    assert not list((tmp_path / "out").glob("*.png"))


def test_module_help_runs():
    proc = subprocess.run([sys.executable, "-m", "megatron_vgpo.analysis.attention", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--model" in proc.stdout and "--data" in proc.stdout
