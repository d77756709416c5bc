"""Config tree: YAML + overrides, strict named errors, cross-field rules, dump round trip, examples."""

import pathlib
import subprocess
import sys
import typing

import pytest
import yaml

from megatron_vgpo.config import Config, ConfigError, dump_yaml, load_config, validate
from megatron_vgpo.config.reference import BEGIN, END, config_reference_markdown, iter_fields

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))


def _other_value(tp, default, path=""):
    """A valid value different from ``default`` for annotation ``tp``, as an override string."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = [a for a in typing.get_args(tp) if a != default]
        return str(choices[0]) if choices else str(default)
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _other_value(inner, default if default is not None else (3 if inner is int else 1.5), path)
    if tp is bool:
        return "false" if default else "true"
    if tp is int:
        return str((default or 0) + 3)
    if tp is float:
        return repr((default or 0.0) * 0.5 + 0.31)
    if tp is str:
        return "some_module:some_fn" if path.endswith("custom_fn") else "x_y"
    if tp is list:
        return "[a.parquet, b.parquet]"
    raise AssertionError(tp)


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"cpu_tiny.yaml", "qwen25vl_3b.yaml", "qwen25vl_7b.yaml", "qwen25vl_32b.yaml",
            "qwen25vl_72b.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_yaml_loads_and_validates(path):
    cfg = load_config(str(path))
    # The cluster configs are laid out for their documented GPU counts; check one that fits.
    world = cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size * 2
    validate(cfg, world_size=world)


def test_paper_table7_settings_in_gpu_examples():
    for name in ("qwen25vl_3b", "qwen25vl_7b", "qwen25vl_32b", "qwen25vl_72b"):
        cfg = load_config(str(ROOT / "examples" / "configs" / f"{name}.yaml"))
        assert (cfg.rollout.n, cfg.optimizer.lr, cfg.trainer.global_batch_size, cfg.data.rollout_batch_size) == (
            8, 1e-6, 128, 512)
        assert (cfg.rollout.max_prompt_length, cfg.rollout.max_response_length) == (4096, 2048)
        v = cfg.algorithm.vgpo
        assert (v.beta, v.gamma, v.kappa) == (0.3, 0.5, 0.2)
    cfg32 = load_config(str(ROOT / "examples" / "configs" / "qwen25vl_32b.yaml"))
    assert validate(cfg32, world_size=32).describe() == "world size 32 = TP 8 x PP 2 x DP 2"


@pytest.mark.parametrize("path,tp,default", [(p, t, d) for p, t, d, _ in iter_fields(Config)],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_every_field_is_overridable(path, tp, default):
    value = _other_value(tp, default, path)
    overrides = [f"{path}={value}"]
    if path == "algorithm.overlong.buffer_length":
        overrides.append("rollout.max_response_length=4096")
    if path == "data.min_pixels":
        overrides[0] = f"{path}=1000"
    if path == "trainer.global_batch_size":
        overrides[0] = f"{path}=256"
        overrides.append("data.rollout_batch_size=512")
    if path == "parallel.sequence_parallel":
        overrides.append("parallel.tensor_model_parallel_size=2")
    if path == "parallel.virtual_pipeline_model_parallel_size":
        overrides.append("parallel.pipeline_model_parallel_size=2")
    if path == "data.rollout_batch_size":
        overrides[0] = f"{path}=1024"
    if path == "optimizer.min_lr":
        overrides[0] = f"{path}=1e-7"
    if path == "algorithm.hidden_states_from":
        overrides.append("trainer.micro_batch_size=8")  # group-aligned micro-batches (rollout.n = 8)
    if path == "algorithm.shapers":
        overrides[0] = f"{path}=[entropy]"
    if path == "algorithm.loss_terms":
        overrides[0] = f"{path}=[papo]"
    if path in ("data.claim_key", "data.claim_label_key"):
        overrides[0] = f"{path}=other_{{i}}"
    if path == "algorithm.rollout_methods":
        overrides[0] = f"{path}=[noisy_rollout]"
    if path == "trainer.stop_signals":
        overrides[0] = f"{path}=[SIGINT]"
    cfg = load_config(None, overrides)
    got = cfg
    for key in path.split("."):
        got = getattr(got, key)
    if typing.get_origin(tp) is typing.Literal and len(typing.get_args(tp)) == 1:  # a single choice
        with pytest.raises(ConfigError, match=rf"{path}: invalid value 'other'"):
            load_config(None, [f"{path}=other"])
        return
    assert got != default, f"override of {path} did not land"
    raw = overrides[0].split("=", 1)[1]
    expected = float(raw) if isinstance(got, float) else (raw if isinstance(got, str) else yaml.safe_load(raw))
    assert got == expected


def test_yaml_then_overrides_then_dump_round_trip(tmp_path):
    src = tmp_path / "c.yaml"
    src.write_text("algorithm:\n  vgpo:\n    beta: 0.1\nrollout:\n  n: 4\n")
    cfg = load_config(str(src), ["algorithm.vgpo.beta=0.5", "model.hf_path=/a/b", "rollout.sampling.top_p=0.9"])
    assert (cfg.algorithm.vgpo.beta, cfg.rollout.n, cfg.model.hf_path, cfg.rollout.sampling.top_p) == (
        0.5, 4, "/a/b", 0.9)
    assert cfg.algorithm.vgpo.gamma == 0.5  # default kept
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_yaml(cfg))
    assert load_config(str(dumped)) == cfg


def test_exponent_floats_without_a_dot(tmp_path):
    # PyYAML (YAML 1.1) reads "1e-6" as a string; float fields accept it from files and overrides.
    p = tmp_path / "c.yaml"
    p.write_text("optimizer:\n  lr: 1e-6\n")
    assert load_config(str(p)).optimizer.lr == 1e-6
    assert load_config(None, ["optimizer.lr=2e-5"]).optimizer.lr == 2e-5


def test_string_override_stays_a_string():
    cfg = load_config(None, ["model.hf_path=123", "logging.run_name=true"])
    assert cfg.model.hf_path == "123" and cfg.logging.run_name == "true"


@pytest.mark.parametrize("overrides,pattern", [
    (["algorithm.vgpo.bta=1"], r"unknown key 'algorithm\.vgpo\.bta'.*did you mean 'beta'"),
    (["algorithm.vgpo.gamma=0"], r"algorithm\.vgpo\.gamma=0\.0 is invalid: must be in \(0, 1\]"),
    (["algorithm.vgpo.gamma=1.5"], r"algorithm\.vgpo\.gamma=1\.5 is invalid: must be in \(0, 1\]"),
    (["algorithm.vgpo.kappa=-0.1"], r"algorithm\.vgpo\.kappa=-0\.1 is invalid"),
    (["algorithm.vgpo.schedule=cubic"], r"algorithm\.vgpo\.schedule: invalid value 'cubic'.*'linear', 'exponential', 'step'"),
    (["rollout.n=abc"], r"rollout\.n: invalid value 'abc' \(str\); expected int"),
    (["rollout.n=2.5"], r"rollout\.n: invalid value 2\.5 \(float\); expected int"),
    (["trainer.total_steps=true"], r"trainer\.total_steps: invalid value True \(bool\); expected int"),
    (["optimizer.lr=fast"], r"optimizer\.lr: invalid value 'fast'"),
    (["data.train_files=x.parquet"], r"data\.train_files: invalid value 'x\.parquet' \(str\); expected list"),
    (["rollout.n=1"], r"rollout\.n=1 is invalid: group-relative advantages need >= 2"),
    (["rollout.n=0"], r"rollout\.n=0 is invalid: must be > 0"),
    (["algorithm.clip_ratio_c=0.5"], r"algorithm\.clip_ratio_c=0\.5 is invalid: the dual-clip bound must be > 1"),
    (["parallel.sequence_parallel=true"], r"parallel\.sequence_parallel=true needs parallel\.tensor_model_parallel_size > 1"),
    (["data.min_pixels=10", "data.max_pixels=5"], r"data\.min_pixels=10 exceeds data\.max_pixels=5"),
    (["data.rollout_batch_size=100"], r"data\.rollout_batch_size=100 must be a multiple of trainer\.global_batch_size=128"),
    (["reward.custom_fn=mymodule"], r"reward\.custom_fn='mymodule' is invalid: expected 'module:function'"),
    (["algorithm.vgpo=1"], r"sets the section 'algorithm\.vgpo'"),
    (["algorithm.beta.x=1"], r"unknown key 'algorithm\.beta'"),
    (["rollout.n"], r"override 'rollout\.n' is not of the form key\.sub=value"),
    (["algorithm.overlong.enable=true", "rollout.max_response_length=100"],
     r"algorithm\.overlong\.buffer_length=512 exceeds rollout\.max_response_length=100"),
    (["parallel.virtual_pipeline_model_parallel_size=2"], r"parallel\.virtual_pipeline_model_parallel_size=2 is invalid"),
])
def test_named_errors(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_unknown_yaml_keys_and_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rollout:\n  sampling:\n    temprature: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'rollout\.sampling\.temprature'.*did you mean 'temperature'"):
        load_config(str(p))
    p.write_text("algorthm:\n  kl_coef: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'algorthm'; did you mean 'algorithm'"):
        load_config(str(p))
    p.write_text("rollout: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(p))
    p.write_text("rollout: 3\n")
    with pytest.raises(ConfigError, match=r"rollout: invalid value 3 \(int\); expected RolloutConfig"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_world_size_rules():
    cfg = load_config(None, ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"])
    assert validate(cfg, world_size=8).describe() == "world size 8 = TP 2 x PP 2 x DP 2"
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by parallel\.tensor_model_parallel_size "
                                          r"x parallel\.pipeline_model_parallel_size = 2 x 2 = 4"):
        validate(cfg, world_size=6)
    cfg = load_config(None, ["trainer.global_batch_size=2", "data.rollout_batch_size=4"])
    assert validate(cfg, world_size=2).dp == 2
    with pytest.raises(ConfigError, match=r"trainer\.global_batch_size=2 prompts per mini-batch cannot be shared "
                                          r"over DP = 4 data-parallel ranks"):
        validate(cfg, world_size=4)


def _train(*args, env=None):
    return subprocess.run([sys.executable, "-m", "megatron_vgpo.train", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def test_dry_run_prints_resolved_config_and_layout():
    r = _train("--config", "examples/configs/qwen25vl_32b.yaml", "--dry-run", "--world-size", "32",
               "algorithm.vgpo.beta=0.5")
    assert r.returncode == 0, r.stderr
    assert "# parallel layout: world size 32 = TP 8 x PP 2 x DP 2" in r.stdout
    resolved = yaml.safe_load(r.stdout)
    assert resolved["algorithm"]["vgpo"]["beta"] == 0.5 and resolved["rollout"]["n"] == 8


def test_dry_run_errors_exit_nonzero_with_the_field():
    r = _train("--config", "examples/configs/qwen25vl_32b.yaml", "--dry-run", "--world-size", "12")
    assert r.returncode == 2 and "world size 12 is not divisible" in r.stderr
    r = _train("--config", "examples/configs/cpu_tiny.yaml", "--dry-run", "algorithm.vgpo.gama=0.4")
    assert r.returncode == 2 and "did you mean 'gamma'" in r.stderr


def test_readme_config_reference_in_sync():
    text = (ROOT / "README.md").read_text()
    assert BEGIN in text and END in text, "README.md lacks the config reference markers"
    embedded = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert embedded == config_reference_markdown(), "run: python tools/config_reference.py --write"


def test_every_field_documented():
    for path, _, _, help in iter_fields(Config):
        assert help, f"{path} has no help text"
