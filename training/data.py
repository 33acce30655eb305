"""Loading PAGASA daily weather and DRRMO flood days into one labelled table.

Conventions (``../shared/data/README.md``): RAINFALL ``-1`` is a trace (< 0.1 mm, taken
as 0.05 mm), ``-999`` is missing in any column; temperature is (TMAX + TMIN) / 2.
A station-day is labelled 1 when its date is an official flood day, 0 when its year is a
labelled year but the date is not listed; days of unlabelled years are dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.checksum import sha256_file
from core.errors import DataError
from core.observation import FIELD_NAMES

logger = logging.getLogger(__name__)

TRACE_MM = 0.05
MISSING = -999
WEATHER_COLUMNS = ("YEAR", "MONTH", "DAY", "RAINFALL", "TMAX", "TMIN", "RH", "WIND_SPEED")
TABLE_COLUMNS = ("date", "year", "station", *FIELD_NAMES, "flood")


@dataclass(frozen=True)
class Dataset:
    """A labelled station-day table plus where it came from."""

    table: pd.DataFrame
    data_source: str  # "real" or "synthetic"
    file_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def years(self) -> list[int]:
        return sorted(int(y) for y in self.table["year"].unique())


def read_station(path: Path) -> pd.DataFrame:
    """One station's daily weather with the sentinel values decoded; one row per day."""
    return decode_station(pd.read_csv(path), source=str(path))


def decode_station(raw: pd.DataFrame, *, source: str) -> pd.DataFrame:
    """PAGASA columns -> observation fields, with antecedent sums over a full calendar."""
    missing_cols = [c for c in WEATHER_COLUMNS if c not in raw.columns]
    if missing_cols:
        raise DataError(f"{source}: missing columns {missing_cols}")
    raw = raw.replace(MISSING, np.nan)
    rainfall = raw["RAINFALL"].astype(float)
    rainfall = rainfall.mask(rainfall == -1, TRACE_MM)
    if (rainfall < 0).any():
        bad = int((rainfall < 0).sum())
        raise DataError(f"{source}: {bad} negative RAINFALL values other than -1 (trace)")
    dates = pd.to_datetime({"year": raw["YEAR"], "month": raw["MONTH"], "day": raw["DAY"]}, errors="coerce")
    if dates.isna().any():
        raise DataError(f"{source}: {int(dates.isna().sum())} rows with an invalid date")
    frame = pd.DataFrame(
        {
            "date": dates,
            "rainfall": rainfall,
            "temperature": (raw["TMAX"] + raw["TMIN"]) / 2.0,
            "humidity": raw["RH"].astype(float),
            "wind_speed": raw["WIND_SPEED"].astype(float),
        }
    )
    frame = frame.drop_duplicates("date").sort_values("date").set_index("date")
    # Reindex to a full calendar so rolling windows count days, not rows.
    full = pd.date_range(frame.index.min(), frame.index.max(), freq="D")
    frame = frame.reindex(full)
    frame.index.name = "date"
    # Antecedent sums over the available days of the window; a missing day adds nothing.
    # Rounded: pandas' running sums drift by ~1e-14, enough to make a 7-day sum "smaller"
    # than the 3-day one; readings have 0.05 mm resolution.
    frame["rainfall_3d"] = frame["rainfall"].rolling(3, min_periods=1).sum().round(3)
    frame["rainfall_7d"] = frame["rainfall"].rolling(7, min_periods=1).sum().round(3)
    frame["month"] = pd.DatetimeIndex(frame.index).month.astype(float)
    return frame.reset_index()


def read_flood_days(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, usecols=["date"])
    frame["date"] = pd.to_datetime(frame["date"], errors="coerce")
    if frame["date"].isna().any():
        raise DataError(f"{path}: unparseable dates")
    return frame


def load_dataset(data_dir: Path) -> Dataset:
    """The labelled table from a data folder laid out like ``../shared/data``."""
    weather_dir = data_dir / "pagasa"
    flood_path = data_dir / "flood_days.csv"
    station_files = sorted(weather_dir.glob("*.csv")) if weather_dir.is_dir() else []
    if not station_files or not flood_path.is_file():
        raise DataError(f"{data_dir}: expected pagasa/*.csv and flood_days.csv")

    flood_dates = read_flood_days(flood_path)["date"]
    labelled_years = set(flood_dates.dt.year)
    flood_set = set(flood_dates)

    parts = []
    for path in station_files:
        station = read_station(path)
        station["station"] = path.stem
        parts.append(station)
    table = pd.concat(parts, ignore_index=True)
    table["year"] = table["date"].dt.year
    table = table[table["year"].isin(labelled_years)].copy()
    before = len(table)
    table = table.dropna(subset=["rainfall", "temperature", "humidity"])
    if before != len(table):
        logger.info("dropped %d station-days with missing required weather", before - len(table))
    table["flood"] = table["date"].isin(flood_set).astype(int)
    if table.empty or table["flood"].sum() == 0:
        raise DataError(f"{data_dir}: no labelled flood day has weather")
    files = {str(p.relative_to(data_dir)): sha256_file(p) for p in [*station_files, flood_path]}
    table = table.loc[:, list(TABLE_COLUMNS)].sort_values(["date", "station"])
    logger.info(
        "loaded %d station-days, %d flood station-days (%d flood days), years %s",
        len(table),
        int(table["flood"].sum()),
        table.loc[table["flood"] == 1, "date"].nunique(),
        sorted(int(y) for y in table["year"].unique()),
    )
    return Dataset(table=table.reset_index(drop=True), data_source="real", file_sha256=files)


def has_real_data(data_dir: Path | None) -> bool:
    return bool(
        data_dir and (data_dir / "flood_days.csv").is_file() and any((data_dir / "pagasa").glob("*.csv"))
    )
