"""The pipeline schema: valid files load; each kind of bad file gives one line naming file, line, field."""

import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.config import ConfigError, load

GOOD = textwrap.dedent("""\
    name: fashion-distill
    seed: 0
    data: {dataset: fashion-mnist, batch_size: 256, val_size: 5000}
    stages:
      teacher:     {type: train, model: resnet20, epochs: 3}
      mnv2:        {type: distill, from: teacher, model: mobilenetv2_x0_5, method: kd, epochs: 3}
      mnv2-pruned: {type: prune, from: mnv2, target_macs: 0.5, finetune_epochs: 1}
      mnv2-int8:   {type: quantize, from: mnv2-pruned, method: ptq}
    benchmark: {runtimes: [torch, onnxruntime, tensorrt], batch_sizes: [1, 64]}
    """)


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path, text, overrides=None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, overrides)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(str(path))
    return message


def test_good_pipeline_loads_in_dependency_order(tmp_path):
    cfg = load(write(tmp_path, GOOD))
    assert cfg.order() == ["teacher", "mnv2", "mnv2-pruned", "mnv2-int8"]
    assert cfg.inputs("mnv2") == ["teacher"]
    assert cfg.stages["mnv2"].temperature == 4.0
    assert cfg.stages["mnv2-pruned"].target_macs == 0.5


def test_order_follows_dependencies_not_yaml_order(tmp_path):
    head, rest = GOOD.split("stages:\n")
    stage_lines = rest.split("benchmark:")[0].strip("\n").splitlines()
    cfg = load(write(tmp_path, head + "stages:\n" + "\n".join(reversed(stage_lines)) + "\n"))
    assert cfg.order() == ["teacher", "mnv2", "mnv2-pruned", "mnv2-int8"]


@pytest.mark.parametrize("old,new,line,expect", [
    ("epochs: 3}", "epoch: 3}", 5, "stages.teacher.epoch: unknown key 'epoch'; did you mean 'epochs'?"),
    ("batch_size: 256", "batch_size: lots", 3, "data.batch_size: expected a valid integer"),
    ("from: mnv2,", "from: mnv3,", 7, "stages.mnv2-pruned.from: no stage named 'mnv3'; did you mean 'mnv2'?"),
    ("type: quantize", "type: quantise", 8, "unknown stage type 'quantise'"),
    ("seed: 0", "sed: 0", 2, "sed: unknown key 'sed'; did you mean 'seed'?"),
    ("dataset: fashion-mnist", "dataset: mnist", 3, "data.dataset: expected 'fashion-mnist', 'imagefolder' or 'synthetic'"),
    ("target_macs: 0.5", "target_macs: 1.5", 7, "stages.mnv2-pruned.target_macs: expected less than 1"),
    ("from: teacher,", "from: mnv2-pruned,", 6, "cycle"),
    ("mnv2-int8:   {type: quantize, from: mnv2-pruned", "mnv2-int8:   {type: quantize", 8, "required field is missing"),
])
def test_bad_values_name_line_field_and_fix(tmp_path, old, new, line, expect):
    assert old in GOOD
    message = error_of(tmp_path, GOOD.replace(old, new, 1))
    assert f"p.yaml:{line}:" in message
    assert expect in message


def test_cycle_names_only_the_stages_on_it(tmp_path):
    message = error_of(tmp_path, GOOD.replace("from: teacher,", "from: mnv2-pruned,"))
    assert "mnv2, mnv2-pruned depend on each other" in message
    assert "mnv2-int8" not in message


def test_malformed_yaml_and_wrong_top_level(tmp_path):
    assert "malformed YAML" in error_of(tmp_path, GOOD.replace("seed: 0", "seed: [0"))
    assert "expected a mapping" in error_of(tmp_path, "- just\n- a list\n")
    assert "empty" in error_of(tmp_path, "")


def test_quantized_model_cannot_feed_training(tmp_path):
    text = GOOD + "  again: {type: prune, from: mnv2-int8, target_macs: 0.5}\n"
    text = text.replace("benchmark: {runtimes: [torch, onnxruntime, tensorrt], batch_sizes: [1, 64]}\n", "")
    assert "INT8 ONNX model" in error_of(tmp_path, text)


def test_overrides_apply_and_bad_ones_are_named(tmp_path):
    path = write(tmp_path, GOOD)
    cfg = load(path, ["stages.teacher.epochs=1", "data.batch_size=64", "benchmark.batch_sizes=[1, 8]"])
    assert cfg.stages["teacher"].epochs == 1 and cfg.data.batch_size == 64
    assert cfg.benchmark.batch_sizes == [1, 8]
    with pytest.raises(ConfigError, match=r"--set stages.teacher.epochs\): stages.teacher.epochs: expected"):
        load(path, ["stages.teacher.epochs=abc"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load(path, ["stages.teacher.epochs"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such pipeline file"):
        load(tmp_path / "nope.yaml")


def test_shipped_pipelines_are_valid():
    from pathlib import Path

    files = sorted(Path(__file__).parents[1].glob("pipelines/*.yaml"))
    assert files, "no pipelines/*.yaml"
    for f in files:
        load(f)


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                         st.text(max_size=12))
yaml_docs = st.recursive(yaml_scalars, lambda kids: st.lists(kids, max_size=4)
                         | st.dictionaries(st.sampled_from(["name", "seed", "data", "stages", "type", "from", "model",
                                                            "epochs", "teacher", "batch_size", "x", "benchmark"])
                                           | st.text(max_size=6), kids, max_size=5), max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=yaml_docs)
def test_random_documents_never_raise_anything_but_config_error(tmp_path, doc):
    import yaml

    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load(path)
    except ConfigError as exc:
        assert "\n" not in str(exc)


def test_the_name_reference_is_reserved_for_the_committed_reports(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("name: Reference\nstages:\n  t: {type: train, model: resnet8, epochs: 1}\n")
    with pytest.raises(ConfigError, match="reserved"):
        load(f)


def test_a_config_built_in_python_gets_the_graph_checks():
    """PipelineConfig's own validator checks the stage graph, not only `load`: no cycle reaches order()."""
    import pydantic

    from compress.config import PipelineConfig

    def stages(**kw):
        return {"name": "x", "stages": {n: {"type": "distill", "from": src, "model": "resnet8"} for n, src in kw.items()}
                | {"t": {"type": "train", "model": "resnet8"}}}

    for bad, text in ((stages(a="b", b="a"), "the stages a, b depend on each other in a cycle"),
                      (stages(a="tt"), "stages.a.from: no stage named 'tt'; did you mean 't'?")):
        with pytest.raises(pydantic.ValidationError, match=text):
            PipelineConfig.model_validate(bad)
    assert PipelineConfig.model_validate(stages(b="a", a="t")).order() == ["t", "a", "b"]
