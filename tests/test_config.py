"""Training configs: strict validation naming the key, and the DS2 guard."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.analysis.dsp import FilterSpec
from train.config import ConfigError, load_train_config
from train.trainer import DataLeakError, check_split

REPO = Path(__file__).resolve().parent.parent


def test_shipped_configs_validate() -> None:
    configs = sorted((REPO / "configs").glob("train-*.yaml"))
    assert configs
    for path in configs:
        assert load_train_config(path).model.cell in ("lstm", "gru", "rnn")


def test_filter_section_is_the_dsp_filter_spec(tmp_path: Path) -> None:
    shipped = load_train_config(REPO / "configs" / "train-lstm.yaml")
    assert shipped.filter == FilterSpec() == FilterSpec(low_hz=0.5, high_hz=40.0, order=2)  # the defaults
    path = tmp_path / "c.yaml"
    path.write_text("filter:\n  low_hz: 1.0\n  high: 30\n")
    with pytest.raises(ConfigError, match=r"filter\.high"):
        load_train_config(path)


def test_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  epochs: 3\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_train_config(path)


def test_bad_value_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  cell: transformer\n")
    with pytest.raises(ConfigError, match=r"model\.cell"):
        load_train_config(path)


def test_override_with_unknown_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    with pytest.raises(ConfigError, match=r"model\.hidden"):
        load_train_config(path, {"model.hidden": 3})


@pytest.mark.parametrize("field", ["train_records", "val_records"])
@pytest.mark.parametrize(("named", "leaked"), [("mitdb/232", "mitdb/232"), ("mitdb/DS2", "mitdb/100"),
                                               ("mitdb/all", "mitdb/all"), ("MITDB/100", "mitdb/100"),
                                               ("232", "mitdb/232"), (" mitdb/232 ", "mitdb/232")])
def test_ds2_never_trains_or_validates_however_named(tmp_path: Path, field: str, named: str, leaked: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  {field}: [mitdb/101, '{named}', svdb/all]\n")
    with pytest.raises(DataLeakError, match=leaked):
        check_split(load_train_config(path))


def test_ds1_and_other_databases_may_train(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train_records: [mitdb/DS1, svdb/all, incartdb/I01]\n")
    check_split(load_train_config(path))
