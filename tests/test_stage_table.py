"""The stage-type table (compress.config.STAGE_TYPES) is the one list of stage types: every row has an
adapter with the shared signature, and the schema's messages name every row."""

import inspect

import pytest

from compress.config import STAGE_TYPES, ConfigError, load
from compress.stages import runner


@pytest.mark.parametrize("name", list(STAGE_TYPES))
def test_every_stage_type_has_an_adapter_with_the_shared_signature(name):
    signature = inspect.signature(runner(name))
    assert list(signature.parameters) == ["cfg", "ctx"]
    assert signature.parameters["ctx"].annotation == "Context" and signature.return_annotation == "Artifact"
    assert signature.parameters["cfg"].annotation == STAGE_TYPES[name].config.__name__


@pytest.mark.parametrize("body,text", [("{type: trian, model: resnet8}", "unknown stage type 'trian'"),
                                       ("{model: resnet8}", "stage has no 'type'")])
def test_the_type_errors_name_every_row(tmp_path, body, text):
    path = tmp_path / "p.yaml"
    path.write_text(f"name: x\nstages:\n  t: {body}\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert text in str(info.value) and f"expected one of: {', '.join(STAGE_TYPES)}" in str(info.value)


@pytest.mark.parametrize("module, config", [("export", "ExportConfig"), ("engine", "EngineConfig"),
                                            ("benchmark", "BenchmarkConfig"), ("report", "PipelineConfig")])
def test_the_stages_after_the_models_share_it_too(module, config):
    # what they need beyond their config (the artifact, engines, rows, stage times) comes in the context
    from importlib import import_module

    signature = inspect.signature(import_module(f"compress.stages.{module}").run)
    assert list(signature.parameters) == ["cfg", "ctx"]
    assert signature.parameters["cfg"].annotation == config and signature.parameters["ctx"].annotation == "Context"
