from pathlib import Path

import pytest

from vidops.config import ConfigError, config_from_json, load_config


def test_defaults_profile_and_overrides_layer_in_order(tmp_path: Path) -> None:
    base = load_config()
    assert base.samples.counts.shapes == 48
    tiny = load_config("tiny")
    assert tiny.samples.counts.shapes == 96  # profile over params.yaml
    assert tiny.ingest.workers == base.ingest.workers  # untouched keys keep their defaults
    both = load_config("tiny", ["samples.counts.shapes=3", "ingest.default_license=CC-BY-4.0"])
    assert both.samples.counts.shapes == 3  # --set over the profile
    assert both.ingest.default_license == "CC-BY-4.0"

    profile = tmp_path / "mine.yaml"
    profile.write_text("seed: 7\ningest:\n  workers: 2\n")
    mine = load_config(profile, ["seed=9"])
    assert (mine.seed, mine.ingest.workers) == (9, 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ingest.wrokers=2"], "unknown key 'ingest.wrokers'"),
        (["nonsense=1"], "unknown key 'nonsense'"),
        (["ingest.workers=-1"], "'ingest.workers'"),
        (["ingest.workers=many"], "'ingest.workers'"),
        (["samples.kinds=[shapes,cats]"], "'samples.kinds.1'"),
        (["seed"], "key=value"),
        (["train.objective=flow_matching", "train.min_snr_gamma=null"],
         "sampling.sampler 'ddim' cannot sample a flow_matching model"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config("tiny", overrides)


def test_unknown_key_in_a_profile_is_an_error(tmp_path: Path) -> None:
    profile = tmp_path / "typo.yaml"
    profile.write_text("ingest:\n  default_licence: MIT\n")
    with pytest.raises(ConfigError, match=r"unknown key 'ingest\.default_licence'"):
        load_config(profile)


def test_missing_profile_is_an_error() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-profile")


def test_resolved_config_round_trips_through_json() -> None:
    cfg = load_config("tiny", ["seed=3"])
    assert config_from_json(cfg.to_json()) == cfg
    assert cfg.flat()["samples.counts.shapes-finetune"] == cfg.samples.counts.shapes_finetune


def test_configuring_one_workdir_does_not_leak_into_the_next(tmp_path: Path, monkeypatch) -> None:
    from vidops.tracking import mlflow_runs
    from vidops.tracking.workdir import Workdir

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("tiny")
    first = mlflow_runs.configure(cfg, Workdir.at(tmp_path / "a"))
    second = mlflow_runs.configure(cfg, Workdir.at(tmp_path / "b"))
    assert first.endswith("a/mlflow.db") and second.endswith("b/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert mlflow_runs.configure(cfg, Workdir.at(tmp_path / "c")) == "sqlite:///elsewhere.db"


def test_a_model_samples_with_its_cards_settings_unless_a_caller_overrides_them() -> None:
    from vidops.models.sampling import sampling_settings

    cfg = load_config(None)  # params.yaml: generate.* null, train.sampling guidance 6
    card = {"sampling": {"sampler": "dpm", "steps": 20, "guidance_scale": 4.5}}
    assert sampling_settings(cfg, card).model_dump() == card["sampling"]
    # A card without settings (an imported pipeline): this config's train.sampling.
    assert sampling_settings(cfg, {}).model_dump() == cfg.train.sampling.model_dump()
    # generate.* over the card, a command's own flags over both; unset flags fall through.
    cfg = load_config(None, ["generate.guidance_scale=7.0"])
    how = sampling_settings(cfg, card, {"steps": 8, "guidance_scale": None, "sampler": None})
    assert (how.sampler, how.steps, how.guidance_scale) == ("dpm", 8, 7.0)
