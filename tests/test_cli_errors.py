"""Expected failures of `reczero` commands: one `error:` line on stderr, exit status 2, no
traceback, the run directory untouched; --debug / RECZERO_DEBUG=1 let the traceback through."""

import json
import subprocess
import sys

import pytest

from reczero_jax.cli import main

CONFIG = "configs/reczero_ml100k_smollm2.yaml"


def error_of(capsys, *argv) -> str:
    """The one stderr line of ``reczero ARGV``, checked to be an error with status 2."""
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert status == 2, captured
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_missing_config_file(capsys, tmp_path):
    line = error_of(capsys, "train", tmp_path / "nonexistent.yaml")
    assert "nonexistent.yaml not found" in line and "configs/" in line


def test_bad_value_and_unknown_key(capsys):
    assert "train.steps" in error_of(capsys, "train", CONFIG, "train.steps=abc")
    assert "stepz" in error_of(capsys, "train", CONFIG, "train.stepz=3")


def test_bad_choice_fails_before_the_run_directory_is_made(capsys, tmp_path):
    run_dir = tmp_path / "run"
    line = error_of(capsys, "train", CONFIG, "grpo.estimator=foo", f"run_dir={run_dir}")
    assert "grpo.estimator='foo'" in line and "grpo, drgrpo, rloo" in line
    assert not run_dir.exists()


def test_batch_that_does_not_split_over_the_mesh(capsys, tmp_path):
    line = error_of(capsys, "train", CONFIG, "train.prompts_per_step=6", "mesh.fsdp=4",
                    f"run_dir={tmp_path / 'run'}")
    assert "train.prompts_per_step=6" in line and "multiple of 4" in line


def test_missing_model_directory_never_reaches_the_hub(capsys, tmp_path):
    line = error_of(capsys, "eval", "--model", "/nonexistent", "--data", tmp_path)
    assert line == ("error: --model /nonexistent does not exist (pass a Hugging Face model "
                    "directory)")


def test_model_directory_without_config_or_weights(capsys, tmp_path, small_ml100k):
    model = tmp_path / "model"
    model.mkdir()
    line = error_of(capsys, "eval", "--model", model, "--data", small_ml100k)
    assert "has no config.json" in line
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    line = error_of(capsys, "train", CONFIG, f"model.path={model}", f"run_dir={tmp_path / 'r'}")
    assert f"model.path {model} has no weights (model.safetensors" in line
    assert not (tmp_path / "r").exists()


def test_data_directory_not_prepared(capsys, tmp_path, tiny_model_dir):
    line = error_of(capsys, "train", CONFIG, f"model.path={tiny_model_dir}",
                    f"data.dir={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}")
    assert "no prepared dataset under" in line and "reczero data prepare" in line
    assert not (tmp_path / "run").exists()


def test_mesh_larger_than_the_devices(capsys, tmp_path, tiny_model_dir, small_ml100k):
    line = error_of(capsys, "train", CONFIG, f"model.path={tiny_model_dir}",
                    f"data.dir={small_ml100k}", f"run_dir={tmp_path / 'run'}", "mesh.tensor=16")
    assert "needs 16 devices, but only 8 are visible" in line


def test_other_commands(capsys, tmp_path):
    # model.path away from artifacts/, which `make demo` fills in a working tree.
    assert "pass --model-config" in error_of(capsys, "plan", CONFIG,
                                             f"model.path={tmp_path / 'absent'}", "--slice",
                                             "v5p-8")
    assert "unknown slice" in error_of(capsys, "plan", CONFIG, "--slice", "h100-8",
                                       "--model-config", "qwen2.5-7b")
    assert "use SPLIT=N" in error_of(capsys, "data", "prepare", "--dataset", "movielens-100k",
                                     "--out", tmp_path, "--max-samples", "dev=3")


def test_debug_shows_the_traceback(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="nonexistent.yaml not found"):
        main(["--debug", "train", str(tmp_path / "nonexistent.yaml")])
    monkeypatch.setenv("RECZERO_DEBUG", "1")
    with pytest.raises(ValueError, match="grpo.estimator"):
        main(["train", CONFIG, "grpo.estimator=foo"])


def test_config_imports_no_jax():
    code = ("import sys, reczero_jax.config; "
            "print(sorted(m for m in ('jax', 'flax', 'optax') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
