"""The command line: samples, compile, and usage errors exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vidops.cli import main


def test_samples_command_writes_a_corpus(tmp_path: Path, capsys) -> None:
    assert main(["samples", str(tmp_path / "s"), "--kind", "shapes", "--count", "2",
                 "--seed", "5", "--quiet"]) == 0
    videos = sorted(p.name for p in (tmp_path / "s").iterdir() if p.suffix in (".mp4", ".mkv"))
    assert len(videos) == 2
    assert (tmp_path / "s" / "holdout.txt").is_file()
    assert "wrote 2 shapes videos" in capsys.readouterr().out


def test_compile_command_writes_kfp_yaml(tmp_path: Path) -> None:
    out = tmp_path / "c.yaml"
    assert main(["compile", "--pipeline", "curation", "--out", str(out)]) == 0
    assert next(yaml.safe_load_all(out.read_text()))["pipelineInfo"]["name"] == "vidops-curation"


def test_global_options_work_before_and_after_the_subcommand(tmp_path: Path) -> None:
    before = main(["--workdir", str(tmp_path / "w"), "--set", "bogus=1", "samples",
                   str(tmp_path / "s"), "--kind", "shapes"])
    after = main(["samples", str(tmp_path / "s"), "--kind", "shapes", "--set", "bogus=1"])
    assert before == after == 2


def test_set_before_and_after_the_subcommand_both_apply(tmp_path: Path) -> None:
    out = tmp_path / "t.yaml"
    assert main(["--set", "resources.pretrain.cpu=3", "compile", "--pipeline", "training",
                 "--out", str(out), "--set", "resources.pretrain.memory=5G"]) == 0
    text = out.read_text()
    assert "resourceCpuLimit: '3'" in text and "resourceMemoryLimit: 5G" in text


@pytest.mark.parametrize("argv", [["samples", "x", "--kind", "cats"], ["compile", "--out", "x"],
                                  ["generate", "--prompt", "a red circle moving left"],
                                  ["pretrain", "--nproc", "two"]])
def test_bad_usage_exits_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_a_stage_refuses_an_input_that_is_not_a_finished_stage_output(tmp_path: Path,
                                                                     capsys) -> None:
    (tmp_path / "half").mkdir()
    assert main(["filter", "--in", str(tmp_path / "half"), "--out", str(tmp_path / "out"),
                 "--workdir", str(tmp_path / "w"), "--quiet"]) == 2
    assert "not a finished stage output" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pretrain_refuses_data_that_is_not_an_encoded_dataset(tmp_path: Path, capsys) -> None:
    (tmp_path / "half").mkdir()
    assert main(["pretrain", "--data", str(tmp_path / "half"), "--out", str(tmp_path / "m"),
                 "--workdir", str(tmp_path / "w"), "--quiet"]) == 2
    assert "not a finished stage output" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
