"""The pydantic base of every manifest table: unknown keys are errors, values are frozen."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FiniteFloat", "SettingsModel"]

#: A float that is neither NaN nor infinite.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class SettingsModel(BaseModel):
    """A manifest table: extra keys forbidden, frozen, defaults validated too."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
