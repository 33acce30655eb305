from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from core.errors import DataError
from training.data import TRACE_MM, has_real_data, load_dataset

HEADER = "YEAR,MONTH,DAY,RAINFALL,TMAX,TMIN,RH,WIND_SPEED,WIND_DIRECTION\n"


def write_data(root: Path, rows: dict[str, list[str]], flood_days: list[str]) -> Path:
    (root / "pagasa").mkdir(parents=True)
    for station, lines in rows.items():
        (root / "pagasa" / f"{station}.csv").write_text(HEADER + "\n".join(lines) + "\n")
    (root / "flood_days.csv").write_text(
        "date,reports,max_depth,disturbance\n" + "".join(f"{d},1,knee,\n" for d in flood_days)
    )
    return root


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    lines = [
        "2022,1,1,-1,30,24,80,2,90",  # trace
        "2022,1,2,10,30,22,85,-999,90",  # missing wind: kept, wind NaN
        "2022,1,3,-999,31,23,70,3,90",  # missing rain: row dropped, adds nothing to sums
        "2022,1,4,20,-999,23,70,3,90",  # missing TMAX: row dropped
        "2022,1,5,5,30,24,90,3,90",
        "2021,12,31,99,30,24,90,3,90",  # unlabelled year: dropped, but counts in 2022's sums
    ]
    return write_data(tmp_path / "data", {"naia": lines}, ["2022-01-02"])


def test_trace_missing_and_temperature(tiny: Path) -> None:
    table = load_dataset(tiny).table.set_index("date")
    assert table.loc["2022-01-01", "rainfall"] == pytest.approx(TRACE_MM)
    assert table.loc["2022-01-01", "temperature"] == pytest.approx(27.0)
    assert table["wind_speed"].isna()[pd.Timestamp("2022-01-02")]
    assert pd.Timestamp("2022-01-03") not in table.index
    assert pd.Timestamp("2022-01-04") not in table.index


def test_labels_by_year_and_unlabelled_years_dropped(tiny: Path) -> None:
    dataset = load_dataset(tiny)
    table = dataset.table.set_index("date")
    assert dataset.years == [2022]
    assert table.loc["2022-01-02", "flood"] == 1
    assert table.loc["2022-01-05", "flood"] == 0
    assert dataset.data_source == "real"
    assert set(dataset.file_sha256) == {"pagasa/naia.csv", "flood_days.csv"}


def test_antecedent_sums_count_calendar_days(tiny: Path) -> None:
    table = load_dataset(tiny).table.set_index("date")
    # 2021-12-31 (99) + 2022-01-01 (trace): the previous year still counts as antecedent rain.
    assert table.loc["2022-01-01", "rainfall_3d"] == pytest.approx(99 + TRACE_MM)
    # 01-05: window 01-03..01-05, 01-03 missing adds nothing, 01-04 rain (20) still counts.
    assert table.loc["2022-01-05", "rainfall_3d"] == pytest.approx(25)
    assert table.loc["2022-01-05", "rainfall_7d"] == pytest.approx(99 + TRACE_MM + 10 + 20 + 5)


def test_missing_layout_is_a_clear_error(tmp_path: Path) -> None:
    assert not has_real_data(tmp_path)
    with pytest.raises(DataError, match="pagasa"):
        load_dataset(tmp_path)


def test_no_flood_day_with_weather_is_an_error(tmp_path: Path) -> None:
    root = write_data(tmp_path / "d", {"naia": ["2022,1,1,0,30,24,80,2,90"]}, ["2022-05-05"])
    with pytest.raises(DataError, match="no labelled flood day"):
        load_dataset(root)


def test_real_data_has_eleven_flood_days(real_data_dir: Path) -> None:
    dataset = load_dataset(real_data_dir)
    table = dataset.table
    flood_days = table.loc[table["flood"] == 1].groupby("year")["date"].nunique().to_dict()
    assert flood_days == {2022: 7, 2023: 4}
    assert dataset.years == [2022, 2023]  # 2024 is unlabelled, 2025 has no weather
    assert (table["rainfall"] >= 0).all()
    assert (table["rainfall_7d"] >= table["rainfall_3d"]).all()
    assert (table["rainfall_3d"] >= table["rainfall"]).all()
