"""The model's input contract: one day of weather, raw fields with units.

Training builds its table with exactly these columns and the service validates requests
against the same definitions, so the two cannot disagree about names, units or ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


@dataclass(frozen=True)
class InputField:
    name: str
    unit: str
    minimum: float
    maximum: float
    required: bool
    description: str


INPUT_FIELDS: tuple[InputField, ...] = (
    InputField("temperature", "°C", -10, 50, True, "daily mean air temperature, (TMAX+TMIN)/2"),
    InputField("humidity", "% RH", 0, 100, True, "relative humidity"),
    InputField("rainfall", "mm", 0, 1000, True, "rainfall over the 24 h of the day"),
    InputField("rainfall_3d", "mm", 0, 3000, False, "rainfall over 3 days, the day included"),
    InputField("rainfall_7d", "mm", 0, 7000, False, "rainfall over 7 days, the day included"),
    InputField("wind_speed", "m/s", 0, 100, False, "mean wind speed"),
    InputField("month", "1-12", 1, 12, False, "calendar month of the day"),
)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in INPUT_FIELDS)
REQUIRED_FIELDS: tuple[str, ...] = tuple(f.name for f in INPUT_FIELDS if f.required)
_BY_NAME = {f.name: f for f in INPUT_FIELDS}


def _field(name: str) -> object:
    spec = _BY_NAME[name]
    default = ... if spec.required else None
    return Field(
        default,
        ge=spec.minimum,
        le=spec.maximum,
        description=f"{spec.description} [{spec.unit}]",
        json_schema_extra={"unit": spec.unit},
    )


class Observation(BaseModel):
    """One station-day of weather as the API accepts it.

    Unknown fields are rejected rather than dropped: a client sending ``rain`` instead of
    ``rainfall`` must hear about it, not get a prediction for a dry day.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=False)

    temperature: float = _field("temperature")  # type: ignore[assignment]
    humidity: float = _field("humidity")  # type: ignore[assignment]
    rainfall: float = _field("rainfall")  # type: ignore[assignment]
    rainfall_3d: float | None = _field("rainfall_3d")  # type: ignore[assignment]
    rainfall_7d: float | None = _field("rainfall_7d")  # type: ignore[assignment]
    wind_speed: float | None = _field("wind_speed")  # type: ignore[assignment]
    month: int | None = _field("month")  # type: ignore[assignment]

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: object) -> object:
        # Lax parsing would read true as 1 (a temperature of 1 °C); a boolean is never a reading.
        if isinstance(value, bool):
            raise ValueError("expected a number, not a boolean")
        return value

    @model_validator(mode="after")
    def _sums_include_the_day(self) -> Observation:
        # A multi-day sum that includes the day cannot be smaller than the day itself.
        if self.rainfall_3d is not None and self.rainfall_3d < self.rainfall:
            raise ValueError("rainfall_3d must be >= rainfall (the 3-day sum includes the day)")
        if self.rainfall_7d is not None:
            shorter = self.rainfall_3d if self.rainfall_3d is not None else self.rainfall
            if self.rainfall_7d < shorter:
                raise ValueError(
                    "rainfall_7d must be >= rainfall_3d and rainfall (the 7-day sum includes them)"
                )
        return self
