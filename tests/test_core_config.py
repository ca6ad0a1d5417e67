"""The core helpers every console script shares: the dataclass CLI plumbing, the dataset location,
and the model-name <-> dataset mapping."""

from __future__ import annotations

import dataclasses

import pytest

from morphocam.config import parse_config
from morphocam.contract import dataset_for_model, explain_model_for, model_name_for


def test_model_name_and_dataset_round_trip():
    for ds in ("smids", "hushem"):
        name = model_name_for(ds)
        assert dataset_for_model(name) == ds
        assert dataset_for_model(explain_model_for(name)) == ds
        assert explain_model_for(explain_model_for(name)) == explain_model_for(name) == f"{name}_explain"
    assert dataset_for_model("someone_elses_model") == "someone_elses_model"


def test_morphocam_data_is_honoured_by_morphocam_train(tmp_path, monkeypatch):
    from morphocam.training.config import TrainConfig

    monkeypatch.setenv("MORPHOCAM_DATA", str(tmp_path))
    cfg = parse_config(TrainConfig, ["--dataset", "smids"], "train")
    assert cfg.data_dir == tmp_path / "smids" and cfg.dataset == "smids"
    assert parse_config(TrainConfig, [], "train").data_dir == tmp_path / "hushem"
    # an explicit --data-dir still wins, and names the dataset
    cfg = parse_config(TrainConfig, ["--data-dir", str(tmp_path / "x" / "SMIDS")], "train")
    assert cfg.data_dir == tmp_path / "x" / "SMIDS" and cfg.dataset == "smids"


def test_client_flags_yaml_and_overrides(tmp_path):
    from morphocam.clients.classify_cli import ClassifyConfig

    yaml_file = tmp_path / "classify.yaml"
    yaml_file.write_text("urls: [a:1, b:2]\nbatch_size: 4\nprogress: false\noutput: r.csv\n")
    cfg = parse_config(ClassifyConfig, ["--config", str(yaml_file), "--batch-size", "2", "x.png", "y.png"], "c")
    assert cfg.urls == ("a:1", "b:2") and cfg.batch_size == 2 and cfg.progress is False
    assert cfg.inputs == ["x.png", "y.png"] and cfg.format == "csv"  # a .csv output defaults to csv
    # repeated --url accumulates (commas too) and replaces the default; switches take --x / --no-x
    cfg = parse_config(ClassifyConfig, ["--url", "h:1", "--url", "h:2,h:3", "--no-progress", "--ssl",
                                        "--timeout", "5", "--retry-deadline", "7", "-o", "out.jsonl", "-"], "c")
    assert cfg.urls == ("h:1", "h:2", "h:3") and cfg.progress is False and cfg.ssl is True
    assert (cfg.timeout_s, cfg.retry_deadline_s, str(cfg.output), cfg.format) == (5.0, 7.0, "out.jsonl", "jsonl")
    assert parse_config(ClassifyConfig, ["x.png"], "c").urls == ("127.0.0.1:8001",)


@pytest.mark.parametrize("argv, message", [
    (["--resume", "x.png"], "--resume needs --output"),
    (["--batch-size", "0", "x.png"], "batch_size must be >= 1"),
    (["--format", "xml", "x.png"], "invalid choice"),
    ([], "INPUT"),
])
def test_classify_usage_errors_exit_2(argv, message, capsys):
    from morphocam.clients.classify_cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_required_option_is_checked_after_the_yaml_file(tmp_path, capsys):
    from morphocam.clients.report_cli import ReportConfig

    with pytest.raises(SystemExit):
        parse_config(ReportConfig, ["r.jsonl"], "report")
    assert "required: --output-dir" in capsys.readouterr().err
    yaml_file = tmp_path / "r.yaml"
    yaml_file.write_text(f"output_dir: {tmp_path / 'out'}\n")
    assert parse_config(ReportConfig, ["--config", str(yaml_file), "r.jsonl"], "report").output_dir == tmp_path / "out"


def test_every_benchmark_subcommand_takes_its_dataclass_options():
    from morphocam.benchmarks.cli import BENCHMARKS, _module, build_parser

    parser = build_parser()
    for name, bench in BENCHMARKS.items():
        cls = getattr(_module(bench), bench.config)
        usage = parser.parse_args([name]).subparser.format_usage()
        assert "[--config CONFIG]" in usage
        for f in dataclasses.fields(cls):
            assert f"[{f.metadata.get('flag', '--' + f.name.replace('_', '-'))}" in usage, (name, f.name)


def test_bench_soak_exit_status_comes_from_its_verdict():
    from morphocam.benchmarks.soak import passed

    good = {"failed_requests": 0, "rss_within_bound": True, "shm_segments_after_shutdown": []}
    assert passed(good)
    assert not passed({**good, "failed_requests": 1})
    assert not passed({**good, "rss_within_bound": False})
    assert not passed({**good, "shm_segments_after_shutdown": ["/dev/shm/x"]})
