"""Device placement: every tensor that reaches the model, the loss functions or the optimizer is on the
training device, and no tensor factory of the training side silently allocates on the CPU.

The runtime check runs the actor's pi_old pass and PPO update through Megatron's real schedule with
the training device set to ``meta``: the CPU moves any tensor there, and a CPU tensor that meets a
meta one raises. The policy chunk is a recording stand-in (a real chunk cannot run on ``meta``: the
vision tower and the M-RoPE positions read tensor values); it records the device of every input and
answers with outputs of the right shapes that depend on its parameter, so the loss functions, the
backward and the optimizer step all run on meta tensors.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from megatron_vgpo.config.schema import AlgorithmConfig
from megatron_vgpo.methods import build_methods
from megatron_vgpo.methods.views import view_row_images
from megatron_vgpo.models.qwen2_5_vl.model import PolicyOutput
from megatron_vgpo.training.actor import Actor, OptimizerStepStats
from megatron_vgpo.training.experience import build_experience
from megatron_vgpo.training.micro_batch import RowImages
from megatron_vgpo.training.offload import OptimizerOffloader
from tests.conftest import REPO, tiny_hf_config
from tests.training.test_micro_batch import IMAGE_PAD, SPEC, example

META = torch.device("meta")


class RecordingChunk(torch.nn.Module):
    """A policy chunk on ``device`` that records the device of everything it receives."""

    def __init__(self, config, device: torch.device, hidden: int = 8):
        from megatron.core.transformer.enums import ModelType

        super().__init__()
        self.config, self.model_type = config, ModelType.encoder_or_decoder  # Megatron's schedule reads them
        self.weight = torch.nn.Parameter(torch.ones(hidden, device=device))
        self.seen: list[tuple[str, torch.device]] = []

    def set_input_tensor(self, tensor) -> None:
        pass

    def zero_grad_buffer(self) -> None:
        self.weight.grad = None

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, image_index=None,
                target_ids=None, compute_entropy=False, return_hidden_states=True):
        for name, value in dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                image_grid_thw=image_grid_thw, target_ids=target_ids).items():
            if value is not None:
                self.seen.append((name, value.device))
        b, w = input_ids.shape
        hidden = self.weight.expand(b, w, -1) * 1.0
        logprobs = hidden.sum(-1) * 0.01 - 1.0
        return PolicyOutput(logprobs=logprobs, entropy=logprobs * 0.0 + 1.0 if compute_entropy else None,
                            hidden_states=hidden if return_hidden_states else None)


class RecordingOptimizer:
    """Records the device of every gradient at ``step``."""

    def __init__(self, params):
        self.params, self.param_groups, self.seen = list(params), [{"lr": 0.1}], []

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        self.seen += [p.grad.device for p in self.params if p.grad is not None]
        return True, 1.0, None


class Groups:
    is_last_stage = is_first_stage = True
    dp_size, dp_rank = 1, 0


def meta_actor(world_of_one):
    from megatron_vgpo.models.qwen2_5_vl.config import arch_from_hf, transformer_config

    hf_config = tiny_hf_config()
    config = transformer_config(hf_config, arch_from_hf(hf_config), world_of_one)
    chunk = RecordingChunk(config, META)
    actor = Actor.__new__(Actor)  # the real methods, around the stand-ins
    actor.chunks = actor.model = [chunk]
    actor.groups, actor.micro_batch_size, actor.device, actor.steps_per_rl_step = Groups(), 2, META, 1
    actor.optimizer = RecordingOptimizer(chunk.parameters())
    actor.scheduler = type("Scheduler", (), {"step": lambda self, increment: None})()
    actor.offloader = OptimizerOffloader(actor.optimizer, [chunk], META, enabled=False)
    actor.max_consecutive_nonfinite, actor.consecutive_nonfinite = 3, 0
    actor.gradients_finite = lambda: True  # it reads gradient values, which meta tensors do not have
    return actor, chunk


def test_every_tensor_reaching_the_model_loss_and_optimizer_is_on_the_training_device(world_of_one):
    actor, chunk = meta_actor(world_of_one)
    decoded = []
    a, b = example("a", [(56, 56)], decoded), example("b", [(56, 84)], decoded)
    prompts = [a, a, b, b]
    images = RowImages.from_prompts(prompts, SPEC, load_pixels=True)
    responses = [[5, 6], [7], [8, 9, 10], [11]]
    exp = build_experience([p.input_ids for p in prompts], responses, [[-0.5] * len(r) for r in responses],
                           [0, 0, 1, 1], [1.0, 0.0, 1.0, 0.0], images, pad_token_id=0, image_token_id=IMAGE_PAD,
                           device=META)
    assert all(t.device == META for t in (exp.input_ids, exp.response_mask, exp.group_ids, exp.rewards))
    assert all(p.device.type == "cpu" and p.dtype == torch.uint8 for p in exp.images.pixels)  # host until used

    methods = build_methods(AlgorithmConfig(shapers=["vgpo"], loss_terms=["papo"], entropy_coef=0.01))
    original, masked_view = methods.views()
    old, stats = actor.forward_statistics(exp, methods.statistics(original))
    assert old.device == META and old.shape == exp.input_ids.shape
    assert stats and all(v.device == META for v in stats.values())
    names = {name for name, _ in chunk.seen}
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"} <= names
    chunk.seen.clear()
    images = view_row_images(masked_view, prompts, range(4), SPEC, seed=1, step=0, load_pixels=True)
    _, view_stats = actor.forward_statistics(exp, methods.statistics(masked_view), images, old_logprobs=False)
    assert view_stats and all(v.device == META for v in view_stats.values())
    assert chunk.seen and all(device == META for _, device in chunk.seen), chunk.seen

    exp.old_logprobs, exp.stats = old, {**stats, **view_stats}
    exp.advantages, exp.loss_mask, exp.outcome = torch.ones_like(old), exp.response_mask, torch.ones_like(exp.rewards)
    chunk.seen.clear()
    steps = actor.update(exp, [[0, 1, 2, 3]], AlgorithmConfig(entropy_coef=0.01), methods)
    assert chunk.seen and all(device == META for _, device in chunk.seen), chunk.seen
    assert actor.optimizer.seen == [META]
    assert isinstance(steps[0], OptimizerStepStats) and "papo/kl" in steps[0].loss_sums
    assert all(v.device == META for v in steps[0].loss_sums.values())

FACTORIES = {"zeros", "ones", "full", "empty", "tensor", "arange", "rand", "randn", "randint", "eye", "linspace"}
HOST_SIDE = {
    # (file, function): tensors built on the host on purpose, and why.
    ("training/experience.py", "build_experience"): "assembled on the host from lists, then moved once",
    ("training/micro_batch.py", "from_prompts"): "patch grids: host metadata for the M-RoPE positions",
    ("training/offload.py", "_host_copy"): "the host buffer of an offloaded tensor",
    ("training/rollout.py", "_add_batch"): "rewards and the dynamic-sampling filter: host statistics of the batch",
    ("models/qwen2_5_vl/pixels.py", "patchify_all"): "grids: device= given (the images' device)",
}


def _factory_calls_without_device(path: Path):
    """``torch.<factory>(...)`` calls with no ``device=`` argument, with their enclosing function."""
    tree = ast.parse(path.read_text())
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and not any(k.arg == "device" for k in node.keywords)):
                yield func.name, node.lineno


def test_no_training_side_tensor_factory_defaults_to_the_cpu():
    """Every ``torch.zeros/ones/full/empty/tensor/arange/...`` call in ``training/`` and ``models/`` names
    its device (``*_like`` factories inherit theirs), except the listed host-side ones."""
    package = REPO / "megatron_vgpo"
    leaks = []
    for path in sorted([*package.glob("training/*.py"), *package.glob("models/**/*.py")]):
        rel = str(path.relative_to(package))
        for func, line in _factory_calls_without_device(path):
            if (rel, func) not in HOST_SIDE and not rel.endswith(("tiny.py", "parity.py")):
                leaks.append(f"{rel}:{line} in {func}()")
    assert not leaks, "tensor factories without device=:\n" + "\n".join(leaks)
