"""The typed micro-batch and its images: each distinct image stored once and shared by the rows of its
prompt (no per-response copy), micro-batches built lazily and re-iterable, and the vision tower run
once per distinct image with the same outputs and gradients as encoding every row's copy."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from megatron_vgpo.config.schema import ModelConfig
from megatron_vgpo.data.dataset import PromptExample
from megatron_vgpo.models.qwen2_5_vl.builder import build_policy
from megatron_vgpo.models.qwen2_5_vl.loading import load_hf_weights
from megatron_vgpo.models.qwen2_5_vl.parity import fixed_multimodal_batch, pixel_spec
from megatron_vgpo.models.qwen2_5_vl.pixels import PixelSpec, patchify_all
from megatron_vgpo.training.experience import build_experience
from megatron_vgpo.training.micro_batch import MicroBatch, MicroBatches, RowImages
from tests.conftest import tiny_hf_config, tiny_hf_model

SPEC = PixelSpec()
IMAGE_PAD = 290


def example(row_id: str, sizes: list[tuple[int, int]], decoded: list) -> PromptExample:
    """A prompt whose ``load_images`` counts its calls in ``decoded``."""
    def load(raw=False):
        decoded.append(row_id)
        return [Image.new("RGB", (w, h), (10 * len(decoded), 0, 0)) for h, w in sizes]

    grid = torch.tensor([SPEC.grid(h, w) for h, w in sizes], dtype=torch.long).view(-1, 3)
    tokens = sum(SPEC.num_tokens(h, w) for h, w in sizes)
    return PromptExample(row_id=row_id, source="t", problem="p", answer="1", prompt_text="",
                         input_ids=torch.tensor([1] + [IMAGE_PAD] * tokens + [2]), image_grid_thw=grid,
                         image_loader=load)


def test_rows_of_a_prompt_share_one_stored_image():
    decoded = []
    a, b, text = example("a", [(56, 56)], decoded), example("b", [(56, 84), (28, 28)], decoded), example("c", [], decoded)
    prompts = [a, a, a, b, b, text]
    images = RowImages.from_prompts(prompts, SPEC, load_pixels=True)
    assert decoded == ["a", "b", "c"]  # once per distinct prompt
    assert len(images.pixels) == 3 and images.row_slots == [(0,), (0,), (0,), (1, 2), (1, 2), ()]
    assert images.grid_thw.tolist() == [[1, 4, 4], [1, 4, 6], [1, 2, 2]]
    assert images.nbytes() == 3 * (56 * 56 + 56 * 84 + 28 * 28)  # uint8 RGB, each image once
    grid, vision = images.select([0, 1, 3, 5])  # two rows of a, one of b, the text row
    assert grid.tolist() == [[1, 4, 4], [1, 4, 4], [1, 4, 6], [1, 2, 2]]  # per slot, every stage
    assert vision.image_index == [0, 0, 1, 2] and len(vision.images) == 3
    assert vision.images[0] is images.pixels[0] and vision.images[1] is images.pixels[1]  # the stored tensor itself
    assert images.select([5]) == (None, None)


def test_without_pixels_only_the_grids_are_kept():
    decoded = []
    images = RowImages.from_prompts([example("a", [(56, 56)], decoded)] * 2, SPEC, load_pixels=False)
    assert decoded == [] and images.pixels is None and images.nbytes() == 0
    grid, vision = images.select([0, 1])
    assert grid.tolist() == [[1, 4, 4]] * 2 and vision is None


def small_experience():
    decoded = []
    a, b = example("a", [(56, 56)], decoded), example("b", [(56, 84)], decoded)
    prompts = [a, a, b, b, a]
    responses = [[5, 6], [7], [8, 9, 10], [11], [12, 13]]
    images = RowImages.from_prompts(prompts, SPEC, load_pixels=True)
    exp = build_experience([p.input_ids for p in prompts], responses, [[-0.5] * len(r) for r in responses],
                           [0, 0, 1, 1, 0], [1.0, 0.0, 1.0, 0.0, 0.5], images, pad_token_id=0,
                           image_token_id=IMAGE_PAD)
    exp.old_logprobs = torch.randn(exp.input_ids.shape)
    exp.advantages = torch.randn(exp.input_ids.shape)
    exp.loss_mask, exp.outcome = exp.response_mask, torch.randn(len(exp))
    exp.stats = {"s": torch.randn(exp.input_ids.shape)}
    return exp


def test_micro_batches_are_lazy_reiterable_and_trimmed():
    exp = small_experience()
    batches = MicroBatches(exp, [4, 0, 2, 3, 1], micro_batch_size=2, loss_inputs=True)
    assert len(batches) == 3
    first, again = list(batches), list(batches)
    for x, y in zip(first, again):
        assert x is not y and torch.equal(x.input_ids, y.input_ids)  # built anew on every pass
    mb = first[0]
    assert mb.rows.tolist() == [4, 0] and mb.input_ids.shape == (2, max(exp.lengths[4], exp.lengths[0]))
    assert torch.equal(mb.old_logprobs, exp.old_logprobs[[4, 0], :mb.input_ids.shape[1]])
    assert torch.equal(mb.outcome, exp.outcome[[4, 0]]) and mb.stats == {}  # no statistic asked for
    assert torch.equal(MicroBatches(exp, [4, 0], 2, True, stat_keys=["s"])[0].stats["s"], exp.stats["s"][[4, 0], :mb.input_ids.shape[1]])
    assert mb.vision.image_index == [0, 0] and len(mb.vision.images) == 1  # one prompt: one image
    assert first[1].rows.tolist() == [2, 3] and first[1].vision.image_index == [0, 0]
    assert first[2].rows.tolist() == [1] and first[2].input_ids.shape == (1, exp.lengths[1])
    mixed = MicroBatches(exp, [1, 2], 2)[0]
    assert mixed.vision.image_index == [0, 1] and mixed.vision.images[0] is exp.images.pixels[0]
    assert MicroBatches(exp, [0, 1], 2)[0].advantages is None  # the pi_old pass carries no loss inputs
    with pytest.raises(IndexError):
        batches[3]


def test_to_moves_every_tensor_and_the_images():
    mb = MicroBatches(small_experience(), [0, 2], 2, loss_inputs=True)[0].to(torch.device("meta"))
    assert all(t.device.type == "meta" for t in mb.device_tensors)
    assert isinstance(mb, MicroBatch) and mb.vision.image_index == [0, 1]


def test_one_encoding_per_distinct_image_gives_the_per_row_outputs_and_gradients(world_of_one):
    """Rows 0 and 2 share an image: encoded once (``image_index``) or once per row (HF's layout), the
    log-probs and every gradient agree."""
    hf_model = tiny_hf_model(tiny_hf_config(), seed=7)
    parity = fixed_multimodal_batch(hf_model.config)
    rows = [0, 1, 0]  # row 0's prompt twice: slots im0 | im1a im1b | im0
    input_ids, attention_mask = parity.input_ids[rows], parity.attention_mask[rows]
    slots = [parity.images[i] for i in (0, 1, 2, 0)]
    per_slot, grid = patchify_all(slots, pixel_spec(hf_model.config))
    distinct, _ = patchify_all(list(parity.images), pixel_spec(hf_model.config))
    results = []
    for pixel_values, image_index in ((per_slot, None), (distinct, [0, 1, 2, 0])):
        chunk = build_policy(hf_model.config, ModelConfig(params_dtype="float32"), world_of_one)[0]
        load_hf_weights([chunk], hf_model.state_dict().items())
        out = chunk(input_ids, attention_mask, pixel_values, grid, image_index=image_index)
        (out.logprobs * attention_mask).sum().backward()
        results.append((out.logprobs.detach(), {n: p.grad for n, p in chunk.named_parameters()}))
    (lp_a, grads_a), (lp_b, grads_b) = results
    assert (lp_a - lp_b).abs().max() < 1e-6
    for name, grad in grads_a.items():  # float32 sums in another order: 1e-6 of each tensor's scale
        scale = max(1.0, grad.abs().max().item())
        assert (grad - grads_b[name]).abs().max().item() <= 1e-6 * scale, name
    assert grads_a["vision.patch_embed.proj.weight"].abs().max() > 0
