"""Every distillation method from a pipeline YAML, end to end on tiny synthetic data.

One pipeline, two tiny teachers, one distill stage per method (1 epoch each): the logit
methods across the three student families and an ensemble, the feature methods with a ResNet
teacher and MobileNetV2 / ShuffleNetV2 / MobileNetV3 students (the adapters and the default
layers must work for each), a combination, and a prune stage that fine-tunes with one.
"""

import json
import textwrap

import pytest

from compress.config import load
from compress.io import load_model
from compress.pipeline import run_pipeline

PIPELINE = textwrap.dedent("""\
    name: distill-methods-test
    seed: 0
    data:
      dataset: synthetic
      synthetic: {num_train: 256, num_test: 64, num_classes: 4, image_size: 16, channels: 1}
      batch_size: 32
      val_size: 64
    stages:
      teacher:   {type: train, model: resnet8, epochs: 2, lr: 0.05}
      teacher2:  {type: train, model: resnet8, epochs: 1, lr: 0.05}
      kd:        {type: distill, from: teacher, model: mobilenetv2_x0_35, epochs: 1, lr: 0.05}
      dkd:       {type: distill, from: teacher, model: shufflenetv2_x0_5, epochs: 1, lr: 0.05, method: dkd,
                  dkd: {nckd: 4, warmup_epochs: 0.5}}
      dist:      {type: distill, from: [teacher, teacher2], teacher_weights: [3, 1], model: mobilenetv2_x0_35,
                  epochs: 1, lr: 0.05, method: dist}
      logit_std: {type: distill, from: [teacher, teacher2], model: mobilenetv3_small, epochs: 1, lr: 0.05,
                  method: logit_std}
      fitnet-mnv2:    {type: distill, from: teacher, model: mobilenetv2_x0_35, epochs: 1, lr: 0.05, method: none,
                       features: {method: fitnet}}
      fitnet-shuffle: {type: distill, from: teacher, model: shufflenetv2_x0_5, epochs: 1, lr: 0.05, method: none,
                       features: {method: fitnet, pairs: [[stages.1, units.3], [stages, head]]}}
      at-mnv3:        {type: distill, from: teacher, model: mobilenetv3_small, epochs: 1, lr: 0.05, method: none,
                       features: {method: at}}
      dkd-at:         {type: distill, from: teacher, model: mobilenetv2_x0_35, epochs: 1, lr: 0.05, method: dkd,
                       features: {method: at, weight: 100}}
      dkd-pruned:     {type: prune, from: dkd, target_macs: 0.7, iterative_steps: 1, finetune_epochs: 1,
                       method: dkd, features: {method: fitnet}}
    export: {parity_images: 16}
    benchmark: {runtimes: [torch], batch_sizes: [1], warmup: 0, iters: 1}
    """)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    path = tmp / "pipeline.yaml"
    path.write_text(PIPELINE)
    cfg = load(path, [f"report.dir={tmp / 'reports'}"])
    run_pipeline(cfg, pipeline_path=path, runs_dir=tmp / "runs", log=lambda m: None, progress=False)
    return cfg, tmp / "runs" / cfg.name


def manifest(run_dir, stage):
    return json.loads((run_dir / stage / "manifest.json").read_text())


@pytest.mark.slow
def test_every_method_trains_a_student(run):
    cfg, run_dir = run
    for name, stage in cfg.stages.items():
        if stage.type != "distill":
            continue
        metrics = manifest(run_dir, name)["artifact"]["metrics"]
        assert metrics["distill"]["method"] == stage.method
        assert 0 <= metrics["best_accuracy"] <= 100
        assert all(h["loss"] == h["loss"] for h in metrics["history"])  # finite, not NaN
    assert manifest(run_dir, "dist")["artifact"]["metrics"]["teachers"] == ["teacher", "teacher2"]
    assert manifest(run_dir, "dist")["artifact"]["metrics"]["distill"]["teacher_weights"] == [3, 1]
    # The defaults of each method were resolved into the record.
    logit_std = manifest(run_dir, "logit_std")["artifact"]["metrics"]["distill"]
    assert (logit_std["temperature"], logit_std["alpha"], logit_std["ce_weight"]) == (2.0, 9.0, 0.1)


@pytest.mark.slow
def test_feature_layers_are_named_in_the_record(run):
    _, run_dir = run
    features = {name: manifest(run_dir, name)["artifact"]["metrics"]["distill"]["features"]
                for name in ("fitnet-mnv2", "fitnet-shuffle", "at-mnv3", "dkd-at")}
    assert features["fitnet-mnv2"]["pairs"] == [["stages", "head"]]          # last map of each
    assert features["fitnet-shuffle"]["pairs"] == [["stages.1", "units.3"], ["stages", "head"]]
    assert features["at-mnv3"]["pairs"] == [["stages", "blocks.2"]]          # the student's map at the teacher's size
    assert features["dkd-at"]["weight"] == 100


@pytest.mark.slow
def test_students_come_back_without_hooks_and_export(run):
    cfg, run_dir = run
    for name in ("fitnet-mnv2", "at-mnv3", "dkd-pruned"):
        record = manifest(run_dir, name)
        assert {"model", "onnx"} <= set(record["outputs"])
        model = load_model(run_dir / name / "model.pt")
        assert not any(m._forward_hooks for m in model.modules())
    pruned = manifest(run_dir, "dkd-pruned")["artifact"]
    assert pruned["macs"] < manifest(run_dir, "dkd")["artifact"]["macs"]


def test_unknown_feature_layer_names_the_closest(tmp_path):
    from compress.context import StageError

    text = PIPELINE.split("stages:")[0] + textwrap.dedent("""\
        stages:
          teacher: {type: train, model: resnet8, epochs: 1}
          bad:     {type: distill, from: teacher, model: mobilenetv2_x0_35, epochs: 1, method: none,
                    features: {method: fitnet, pairs: [[stages, block.5]]}}
        """)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    cfg = load(path, [f"report.dir={tmp_path / 'reports'}"])
    with pytest.raises(StageError, match=r"student .* has no layer 'block.5'; did you mean 'blocks.5'"):
        run_pipeline(cfg, pipeline_path=path, runs_dir=tmp_path / "runs", log=lambda m: None, progress=False)
