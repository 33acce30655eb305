"""A synthetic stand-in for the PAGASA/DRRMO data, for machines without ``../shared/data``.

It produces PAGASA-shaped daily weather (so it goes through the same decoding as the real
files) with a wet season June-November, and labels floods with an antecedent-rain rule
plus noise. A model trained on it is tagged ``data_source=synthetic`` and cannot reach
production: it only proves the machinery works.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from training.data import TABLE_COLUMNS, Dataset, decode_station

STATIONS = ("synthetic_north", "synthetic_south")


def _station_weather(rng: np.random.Generator, years: tuple[int, ...]) -> pd.DataFrame:
    days = pd.date_range(f"{min(years)}-01-01", f"{max(years)}-12-31", freq="D")
    month = days.month.to_numpy()
    wet = np.isin(month, [6, 7, 8, 9, 10, 11])
    rain_chance = np.where(wet, 0.6, 0.15)
    # Gamma-shaped daily totals; the wet season brings heavier and more frequent rain.
    amount = rng.gamma(shape=0.7, scale=np.where(wet, 22.0, 8.0))
    rainfall = np.where(rng.random(len(days)) < rain_chance, amount, 0.0).round(1)
    season = np.cos(2 * np.pi * (days.dayofyear.to_numpy() - 120) / 365.0)
    tmax = (32.0 + 1.5 * season - 0.03 * rainfall + rng.normal(0, 0.8, len(days))).round(1)
    tmin = (24.5 + 1.0 * season - 0.01 * rainfall + rng.normal(0, 0.6, len(days))).round(1)
    rh = np.clip(72 + 10 * wet + 0.15 * rainfall + rng.normal(0, 5, len(days)), 30, 100).round()
    wind = np.clip(rng.gamma(2.0, 1.3, len(days)) + 0.02 * rainfall, 0, 30).round()
    return pd.DataFrame(
        {
            "YEAR": days.year,
            "MONTH": month,
            "DAY": days.day,
            "RAINFALL": rainfall,
            "TMAX": tmax,
            "TMIN": tmin,
            "RH": rh,
            "WIND_SPEED": wind,
        }
    )


def generate_dataset(*, seed: int = 0, years: tuple[int, ...] = (2022, 2023)) -> Dataset:
    """Labelled station-days shaped like ``training.data.load_dataset``'s output."""
    rng = np.random.default_rng(seed)
    parts = []
    for station in STATIONS:
        frame = decode_station(_station_weather(rng, years), source=f"synthetic:{station}")
        frame["station"] = station
        parts.append(frame)
    table = pd.concat(parts, ignore_index=True)
    table["year"] = table["date"].dt.year
    # Floods follow a heavy day on wet ground; the noise keeps the rule from being exact.
    pressure = table["rainfall"] + 0.4 * (table["rainfall_3d"] - table["rainfall"])
    noisy = pressure * np.exp(rng.normal(0.0, 0.25, len(table)))
    table["flood"] = (noisy > 60.0).astype(int)
    table = table.loc[:, list(TABLE_COLUMNS)].sort_values(["date", "station"]).reset_index(drop=True)
    fingerprint = hashlib.sha256(
        pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes()
    ).hexdigest()
    return Dataset(
        table=table,
        data_source="synthetic",
        file_sha256={f"synthetic(seed={seed},years={','.join(map(str, years))})": fingerprint},
    )
