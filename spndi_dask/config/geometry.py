"""``[geometry]``: the detector and rocking geometry of a manifest (see DESIGN.md, Geometry).

The table in the manifest is the default of every scan; a scan's ``[scans.geometry]``
overrides single keys (:meth:`~spndi_dask.config.Manifest.geometry_for` merges them).

Examples
--------
>>> g = GeometrySettings(energy_kev=9.0, detector_distance_m=0.5, pixel_size_m=55e-6,
...                      beam_center=(32, 32))
>>> g.rocking_axis, round(g.to_geometry().k, 4)
('y+', 4.561)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, PositiveFloat, model_validator

from spndi_dask.config._base import FiniteFloat, SettingsModel
from spndi_dask.geometry import AXIS_NAMES, Geometry

__all__ = ["Axis", "GeometryOverrides", "GeometrySettings"]

#: A signed lab axis, e.g. ``"y-"``.
Axis = Literal["x+", "x-", "y+", "y-", "z+", "z-"]


class GeometrySettings(SettingsModel):
    """``[geometry]``: detector and rocking geometry (see DESIGN.md, Geometry)."""

    energy_kev: PositiveFloat = Field(
        allow_inf_nan=False, description="photon energy in keV, e.g. 9.0"
    )
    detector_distance_m: PositiveFloat = Field(
        allow_inf_nan=False, description="sample-detector distance in metres, e.g. 0.5"
    )
    pixel_size_m: PositiveFloat = Field(
        allow_inf_nan=False, description="detector pixel pitch in metres, e.g. 55e-6"
    )
    gamma_deg: FiniteFloat = Field(0.0, description="detector arm yaw about +y in degrees")
    delta_deg: FiniteFloat = Field(0.0, description="detector arm elevation about -x in degrees")
    beam_center: tuple[FiniteFloat, FiniteFloat] = Field(
        description="(row, col) of the pixel on the detector-arm axis, e.g. [256.0, 256.0]"
    )
    row_direction: Axis = Field("y-", description=f"one of {', '.join(AXIS_NAMES)}")
    col_direction: Axis = Field("x+", description=f"one of {', '.join(AXIS_NAMES)}")
    rocking_axis: Axis = Field("y+", description=f"one of {', '.join(AXIS_NAMES)}")

    @model_validator(mode="after")
    def _detector_plane(self) -> GeometrySettings:
        self.to_geometry()
        return self

    def to_geometry(self) -> Geometry:
        """The :class:`~spndi_dask.geometry.Geometry` these settings describe."""
        return Geometry(**self.model_dump())


def _known_keys(v: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(v) - set(GeometrySettings.model_fields))
    if unknown:
        raise ValueError(
            f"unknown geometry key(s) {unknown}; allowed: "
            f"{', '.join(GeometrySettings.model_fields)}"
        )
    return v


#: Some ``[geometry]`` keys: the manifest's defaults or a scan's overrides. Only the keys are
#: checked here; the values once defaults and overrides are merged into :class:`GeometrySettings`.
GeometryOverrides = Annotated[dict[str, Any], AfterValidator(_known_keys)]
