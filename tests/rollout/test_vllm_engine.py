"""The vLLM rollout engine against Hugging Face on a tiny Qwen2.5-VL, single process (CPU or GPU).

One engine per module (a build takes 4-9 s on CPU); tests that change its weights restore them.
Reference: ``Qwen2_5_VLForConditionalGeneration`` from the same checkpoint in float32, greedy with the
same vision-token bans; log-probs compared raw (temperature 1) and teacher-forced (the trainer's view).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from megatron_vgpo.config.schema import RolloutConfig
from megatron_vgpo.rollout import (
    RolloutEngine, RolloutGroups, RolloutRequest, SamplingParams, generate_data_parallel, logprob_mismatch,
)
from tests.rollout.conftest import (
    QUESTION, chat_prompt, hf_greedy, hf_state_dict, hf_teacher_forced_logprobs, load_hf_model, perturbed,
    requires_vllm,
)

pytestmark = [pytest.mark.vllm, requires_vllm]

MAX_NEW = 24
GREEDY = SamplingParams(n=1, max_tokens=MAX_NEW, temperature=0.0)
HOST_STATE = {}


@pytest.fixture(scope="module")
def engine(tiny_vl_dir):
    from megatron_vgpo.rollout.vllm_engine import VLLMRolloutEngine

    config = RolloutConfig(max_prompt_length=256, max_response_length=64, kv_cache_memory_bytes=64 << 20,
                           enforce_eager=True, enable_sleep_mode=True, seed=1)
    torch.manual_seed(1234)
    rng, threads = torch.random.get_rng_state(), torch.get_num_threads()
    eng = VLLMRolloutEngine(config, str(tiny_vl_dir), dtype="float32")
    HOST_STATE.update(rng_kept=torch.equal(rng, torch.random.get_rng_state()),
                      threads_kept=torch.get_num_threads() == threads)
    print(f"engine build: {eng.build_seconds:.1f} s")
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf_model(tiny_vl_dir):
    return load_hf_model(tiny_vl_dir)


@pytest.fixture(scope="module")
def mm_request(processor, mm_prompt) -> RolloutRequest:
    text, images, _ = mm_prompt
    return RolloutRequest(processor.tokenizer(text)["input_ids"], images)


@pytest.fixture(scope="module")
def text_request(processor) -> RolloutRequest:
    return RolloutRequest(processor.tokenizer(chat_prompt(processor, QUESTION, 0))["input_ids"])


def test_engine_is_a_rollout_engine_and_keeps_host_state(engine):
    assert isinstance(engine, RolloutEngine)
    assert HOST_STATE == {"rng_kept": True, "threads_kept": True}
    assert torch.set_num_threads.__name__ == "set_num_threads"  # vLLM's CPU worker replaces it


def test_greedy_multimodal_equals_hf_generate(engine, hf_model, mm_request, mm_prompt):
    _, _, inputs = mm_prompt
    batch = engine.generate([mm_request], GREEDY)
    ref_tokens, ref_logprobs = hf_greedy(hf_model, inputs, MAX_NEW, engine.banned_token_ids)
    # vLLM expanded the single <|image_pad|> exactly as the HF processor does.
    assert batch.prompt_token_ids[0] == inputs["input_ids"][0].tolist()
    assert len(set(ref_tokens)) > 3, "degenerate reference; the test would prove little"
    assert batch.response_token_ids[0] == ref_tokens
    gap = max(abs(a - b) for a, b in zip(batch.response_logprobs[0], ref_logprobs))
    trainer = hf_teacher_forced_logprobs(hf_model, inputs, ref_tokens)
    _, rollout, mask = batch.padded()
    mismatch = logprob_mismatch(rollout, trainer.unsqueeze(0), mask)
    print(f"{len(ref_tokens)} tokens; max |logp vLLM - logp HF generate| = {gap:.2e}; "
          f"mismatch vs teacher-forced: mean {mismatch.mean:.2e} max {float(mismatch.abs_diff_max):.2e}")
    assert gap < 1e-4
    assert float(mismatch.abs_diff_max) < 1e-4


def test_expanded_prompt_gives_the_same_rollout(engine, mm_request, mm_prompt):
    _, images, inputs = mm_prompt
    expanded = RolloutRequest(inputs["input_ids"][0].tolist(), images)
    a, b = engine.generate([mm_request, expanded], GREEDY).response_token_ids
    assert a == b


def test_text_only_greedy_equals_hf_generate(engine, hf_model, processor, text_request):
    inputs = processor(text=[chat_prompt(processor, QUESTION, 0)], return_tensors="pt")
    batch = engine.generate([text_request], GREEDY)
    ref_tokens, ref_logprobs = hf_greedy(hf_model, inputs, MAX_NEW, engine.banned_token_ids)
    assert batch.response_token_ids[0] == ref_tokens
    assert max(abs(a - b) for a, b in zip(batch.response_logprobs[0], ref_logprobs)) < 1e-4


def test_seeded_sampling_is_reproducible_and_split_invariant(engine, mm_request, text_request):
    sampling = SamplingParams(n=3, max_tokens=16, temperature=1.0, top_p=0.95, seed=123)
    a = engine.generate([mm_request, text_request], sampling)
    b = engine.generate([mm_request, text_request], sampling)
    assert a.request_index == [0, 0, 0, 1, 1, 1]
    assert a.response_token_ids == b.response_token_ids and a.response_logprobs == b.response_logprobs
    # The second request alone, seeded as the second of a larger batch (a rollout group's share).
    alone = engine.generate([text_request], sampling.shifted(1))
    assert alone.response_token_ids == a.response_token_ids[3:]
    assert len({tuple(t) for t in a.response_token_ids[:3]}) == 3, "the n samples of a prompt must differ"
    other = engine.generate([mm_request, text_request], SamplingParams(n=3, max_tokens=16, temperature=1.0, seed=7))
    assert other.response_token_ids != a.response_token_ids
    assert all(math.isfinite(x) and x <= 0 for lp in a.response_logprobs for x in lp)


def test_seeded_sampling_of_a_batch_larger_than_one_engine_step(engine, mm_request, text_request):
    # 80 prompts x 2 samples: more prefill tokens than vLLM's default per-step budget, so the engine
    # spreads them over steps. Split prefills rewind CPU generators ("CPU Generator does not use
    # offset"); the engine keeps prefills whole on CPU, and the rows equal those of a small batch.
    many = [mm_request, text_request] * 40
    sampling = SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=11)
    assert sum(len(r.prompt_token_ids) for r in many) * 2 > 2048
    a = engine.generate(many, sampling)
    assert a.response_token_ids == engine.generate(many, sampling).response_token_ids
    assert engine.generate(many[-2:], sampling.shifted(78)).response_token_ids == a.response_token_ids[-4:]


def test_finish_reasons_and_lengths(engine, tiny_vl_dir, text_request):
    from transformers import GenerationConfig

    eos = set(GenerationConfig.from_pretrained(tiny_vl_dir).eos_token_id)
    batch = engine.generate([text_request] * 4, SamplingParams(n=4, max_tokens=12, temperature=1.0, seed=0))
    for tokens, reason in zip(batch.response_token_ids, batch.finish_reasons):
        assert (reason == "stop" and tokens[-1] in eos) or (reason == "length" and len(tokens) == 12)
    forced = engine.generate([text_request], SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=0, ignore_eos=True))
    assert forced.finish_reasons == ["length", "length"] and forced.response_lengths == [12, 12]


def vision_loving_lm_head(lm_head: torch.Tensor, banned: tuple[int, ...]) -> torch.Tensor:
    """An lm_head whose argmax is a vision token for every hidden state: banned rows +-u, +-v, u + v
    with |u|, |v| large; all other rows shrunk 100x. max(|h.u|, |h.v|) beats every other logit."""
    gen = torch.Generator().manual_seed(0)
    u, v = (torch.randn(lm_head.shape[1], generator=gen) * 10 for _ in range(2))
    head = lm_head * 0.01
    for row, vec in zip(banned, (u, -u, v, -v, u + v)):
        head[row] = vec
    return head


def test_vision_tokens_are_never_generated(engine, hf_model, mm_request, text_request, mm_prompt):
    banned = engine.banned_token_ids
    assert len(banned) == 5
    original = hf_model.lm_head.weight.detach().clone()
    head = vision_loving_lm_head(original, banned)
    try:
        with torch.no_grad():
            hf_model.lm_head.weight.copy_(head)
            unbanned, _ = hf_greedy(hf_model, mm_prompt[2], 8)
        assert set(unbanned) <= set(banned), "without the ban this model only emits vision tokens"
        engine.update_weights([("lm_head.weight", head)])  # a partial update: the other weights stay
        greedy = engine.generate([mm_request, text_request], GREEDY)
        sampled = engine.generate([mm_request, text_request], SamplingParams(n=8, max_tokens=32, temperature=1.0, seed=5))
        generated = [t for b in (greedy, sampled) for r in b.response_token_ids for t in r]
        assert len(generated) > 100 and not set(generated) & set(banned)
    finally:
        with torch.no_grad():
            hf_model.lm_head.weight.copy_(original)
        engine.update_weights([("lm_head.weight", original)])


@pytest.mark.parametrize("part", ["vision", "language"])
def test_update_weights_follows_hf_and_resets_caches(engine, hf_model, mm_request, mm_prompt, part):
    """New weights from HF-named tensors change the rollout to HF's with the new weights. The prompt is
    generated first with the old weights, so a stale prefix or encoder cache would show."""
    inputs = mm_prompt[2]
    before = engine.generate([mm_request], GREEDY).response_token_ids[0]
    names = ("visual.",) if part == "vision" else ("layers.1.self_attn", "layers.2.mlp")
    new_model = perturbed(hf_model, names, 1.5)
    ref_tokens, ref_logprobs = hf_greedy(new_model, inputs, MAX_NEW, engine.banned_token_ids)
    assert ref_tokens != before, "the perturbation must change HF's output for the test to mean anything"
    try:
        engine.update_weights(hf_state_dict(new_model).items())
        after = engine.generate([mm_request], GREEDY)
        assert after.response_token_ids[0] == ref_tokens
        assert max(abs(a - b) for a, b in zip(after.response_logprobs[0], ref_logprobs)) < 1e-4
    finally:
        engine.update_weights(hf_state_dict(hf_model).items())
    assert engine.generate([mm_request], GREEDY).response_token_ids[0] == before


def test_sleep_and_wake_up_are_logged_no_ops_on_cpu(engine, mm_request, caplog):
    if engine.sleep_supported:
        pytest.skip("sleep mode is supported here (GPU): covered by the GPU tests")
    engine._logged_no_sleep = False
    with caplog.at_level(logging.INFO, logger="megatron_vgpo.rollout.vllm_engine"):
        engine.sleep(level=1), engine.wake_up(), engine.sleep(level=2), engine.wake_up(["weights"])
    assert sum("no-ops" in r.getMessage() for r in caplog.records) == 1
    assert len(engine.generate([mm_request], GREEDY).response_token_ids[0]) > 0


def test_generate_data_parallel_in_a_world_of_one(engine, mm_request, text_request):
    sampling = SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=3)
    groups = RolloutGroups.current(tp_size=1)
    assert (groups.dp_size, groups.tp_size) == (1, 1)
    a = generate_data_parallel(engine, [mm_request, text_request], sampling, groups)
    assert a.response_token_ids == engine.generate([mm_request, text_request], sampling).response_token_ids


@pytest.fixture
def vllm_records():
    """Every record that reaches vLLM's own handler (on the "vllm" logger), after our filters."""
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Capture(level=logging.NOTSET)
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.addHandler(handler)
    yield records
    vllm_logger.removeHandler(handler)


def test_weight_reload_logs_only_what_matters(engine, hf_model, vllm_records, caplog):
    """A full reload (what the trainer does every step) shows nothing at vLLM's console level (INFO):
    the rotary "Failed to load weights" and the reload/cache-reset INFO lines are demoted to DEBUG,
    and our own reload time is DEBUG. A partial reload still shows a warning per layer left out."""
    console = min(h.level for h in logging.getLogger("vllm").handlers if h.level > logging.NOTSET)
    assert console == logging.INFO, "VLLM_LOGGING_LEVEL is not the default; the test assumes INFO"
    with caplog.at_level(logging.DEBUG, logger="megatron_vgpo.rollout.vllm_engine"):
        engine.update_weights(hf_state_dict(hf_model).items())
    shown = [r.getMessage() for r in vllm_records if r.levelno >= console]
    demoted = [r.getMessage() for r in vllm_records if r.levelno < console]
    assert shown == []
    assert {"RotaryEmbedding: Failed to load weights", "MRotaryEmbedding: Failed to load weights",
            "Successfully reset prefix cache"} <= set(demoted)
    ours = [r for r in caplog.records if "vLLM weights reloaded" in r.getMessage()]
    assert [r.levelno for r in ours] == [logging.DEBUG]

    vllm_records.clear()
    engine.update_weights([("lm_head.weight", hf_state_dict(hf_model)["lm_head.weight"])])  # the same values
    shown = [r.getMessage() for r in vllm_records if r.levelno >= console]
    assert "QKVParallelLinear: Failed to load weights" in shown
    assert any(m.startswith("Following weights were not loaded") for m in shown)
    assert not any("RotaryEmbedding" in m for m in shown)


@pytest.mark.parametrize("where", ["request", "engine"])
def test_data_bounds_keep_a_resized_image_token_count(engine, processor, monkeypatch, where):
    """An image already at its smart_resize size for the data bounds keeps its image-token count
    through vLLM's processor given ``processor_size_overrides`` (per request, or for the engine as the
    trainer passes them), equal to the trainer's processor with ``do_resize=False``, with no
    transformers deprecation warning. Bounds below the processor's own minimum (3136 px), so that
    without the overrides vLLM would upscale the 28 x 56 image: 6 image tokens instead of 2."""
    import warnings

    import numpy as np
    from PIL import Image

    from megatron_vgpo.data.images import processor_size_overrides, smart_resize

    bounds = (28 * 28, 112 * 112)
    size = processor_size_overrides(*bounds)
    seed = {"request": 21, "engine": 22}[where]  # fresh images: no multimodal cache hit across cases
    image, default = (Image.fromarray(np.random.RandomState(seed + k).randint(0, 256, (28, 56, 3), dtype=np.uint8))
                      for k in (0, 100))
    assert smart_resize(28, 56, 28, *bounds) == (28, 56)
    text = chat_prompt(processor, QUESTION, 1)
    ids = processor.tokenizer(text)["input_ids"]
    trainer_ids = processor(text=[text], images=[image], do_resize=False, return_tensors="pt")["input_ids"][0].tolist()
    if where == "engine":  # read per request from vLLM's model config: no second engine needed
        mm_config = engine._llm.llm_engine.model_config.multimodal_config
        monkeypatch.setattr(mm_config, "mm_processor_kwargs", size)
        request = RolloutRequest(ids, [image])
    else:
        request = RolloutRequest(ids, [image], mm_processor_kwargs=size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = engine.generate([request], SamplingParams(n=1, max_tokens=2, temperature=0.0))
    assert batch.prompt_token_ids[0] == trainer_ids
    assert trainer_ids.count(engine.image_pad_id) == 2
    assert not [w for w in caught if "min_pixels" in str(w.message)], [str(w.message) for w in caught]
    monkeypatch.undo()
    unbounded = engine.generate([RolloutRequest(ids, [default])], SamplingParams(n=1, max_tokens=2, temperature=0.0))
    assert unbounded.prompt_token_ids[0].count(engine.image_pad_id) == 6  # the overrides were what mattered
