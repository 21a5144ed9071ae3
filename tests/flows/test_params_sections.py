"""params.yaml sections added for scale: ``runtime`` (and --device/--dtype), the per-method norm
bound; a repeated key is an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config.params import ENV_DEVICE, ENV_DTYPE, RuntimeParams, load_params
from flows.engine.precision import runtime


def test_auto_resolves_to_the_cpu_and_float32_without_a_gpu(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert runtime() == ("cpu", "float32")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert runtime() == ("cuda", "bfloat16")
    assert runtime("cuda:1", "auto") == ("cuda:1", "bfloat16")
    assert runtime("cpu", "bfloat16") == ("cpu", "bfloat16")


@pytest.mark.parametrize("device,dtype", [("tpu", "auto"), ("cpu:0", "auto"), ("cpu", "int8")])
def test_bad_runtime_values_are_refused(device, dtype):
    with pytest.raises(ValueError, match="runtime"):
        RuntimeParams(device, dtype)


def test_the_environment_overrides_params_yaml(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("runtime:\n  device: cpu\n  dtype: float32\n", encoding="utf-8")
    monkeypatch.delenv(ENV_DEVICE, raising=False)
    monkeypatch.delenv(ENV_DTYPE, raising=False)
    assert load_params(project=tmp_path).runtime == RuntimeParams("cpu", "float32")
    monkeypatch.setenv(ENV_DTYPE, "bfloat16")
    assert load_params(project=tmp_path).runtime == RuntimeParams("cpu", "bfloat16")
    (tmp_path / "params.yaml").write_text("runtime:\n  device: gpu\n", encoding="utf-8")
    with pytest.raises(Exception, match="runtime.device"):
        load_params(project=tmp_path)


def test_a_section_given_twice_is_an_error_naming_the_line(tmp_path):
    (tmp_path / "params.yaml").write_text("runtime:\n  device: cpu\n\nruntime:\n  device: cuda\n", encoding="utf-8")
    with pytest.raises(Exception, match="line 4: key 'runtime' appears twice"):
        load_params(project=tmp_path)


def test_the_norm_bound_is_the_methods_own_where_the_study_measured_one(tmp_path):
    config = Path(__file__).resolve().parents[2] / "configs" / "smollm2-135m.yaml"
    (tmp_path / "params.yaml").write_text(
        f"model: {config}\nedit:\n  method: alphaedit\n  nas: true\ncollapse:\n  max_norm_ratio: 1.45\n"
        "  norm_ratio_by_method:\n    alphaedit+nas: 1.6\n", encoding="utf-8")
    params = load_params(project=tmp_path)
    assert params.model_config().collapse.max_norm_ratio == 1.6
    other = load_params(project=tmp_path).__class__(**{**params.__dict__, "edit": params.edit.__class__("memit")})
    assert other.model_config().collapse.max_norm_ratio == 1.45
    (tmp_path / "params.yaml").write_text("collapse:\n  norm_ratio_by_method:\n    alphaedt+nas: 1.6\n",
                                          encoding="utf-8")
    with pytest.raises(Exception, match="'alphaedt\\+nas' is not a method label"):
        load_params(project=tmp_path)


def test_the_heap_trim_interval_is_read_and_a_negative_one_refused(tmp_path):
    (tmp_path / "params.yaml").write_text("runtime:\n  heap_trim_every_s: 2\n", encoding="utf-8")
    assert load_params(project=tmp_path).runtime.heap_trim_every_s == 2
    with pytest.raises(ValueError, match="heap_trim_every_s"):
        RuntimeParams(heap_trim_every_s=-0.5)
