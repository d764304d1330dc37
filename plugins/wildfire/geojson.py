"""GeoJSON area checks shared by the NWS connector and storage (no I/O, no dependencies).

:func:`check_geometry` accepts only what PostGIS's ``ST_GeomFromGeoJSON`` is certain to read: a
Polygon or MultiPolygon whose rings are closed, hold at least 4 positions, and whose positions are
``[lon, lat]`` (optionally ``[lon, lat, z]``) numbers within -180..180 / -90..90. Anything else is
refused with a reason; a self-intersecting ring passes (storage repairs it with ``ST_MakeValid``).
"""

from __future__ import annotations

from typing import Any


def _position_ok(pt: Any) -> bool:
    return (isinstance(pt, list) and len(pt) in (2, 3)
            and all(isinstance(c, int | float) and not isinstance(c, bool) for c in pt)
            and -180 <= pt[0] <= 180 and -90 <= pt[1] <= 90)


def _polygon_error(rings: Any) -> str | None:
    if not isinstance(rings, list) or not rings:
        return "polygon has no rings"
    for ring in rings:
        if not isinstance(ring, list) or len(ring) < 4:
            return "ring with fewer than 4 positions"
        if not all(_position_ok(pt) for pt in ring):
            return "position that is not [lon, lat] in range"
        if ring[0][:2] != ring[-1][:2]:
            return "ring not closed"
    return None


def check_geometry(geometry: Any) -> tuple[dict[str, Any] | None, str | None]:
    """``(geometry, None)`` for a well-formed GeoJSON Polygon/MultiPolygon, ``(None, reason)`` otherwise.

    None in, ``(None, None)`` out (NWS zone-based alerts have no polygon: their area is ``ugc``).
    Storage builds the PostGIS area from what passes here, so this is strict: a value PostGIS would
    refuse must never reach it.
    """
    if geometry is None:
        return None, None
    if not isinstance(geometry, dict):
        return None, f"geometry is {type(geometry).__name__}, not a GeoJSON object"
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    if kind == "Polygon":
        error = _polygon_error(coords)
    elif kind == "MultiPolygon":
        error = ("multipolygon has no polygons" if not isinstance(coords, list) or not coords
                 else next((e for e in map(_polygon_error, coords) if e), None))
    else:
        return None, f"geometry type {kind!r} is not Polygon or MultiPolygon"
    if error:
        return None, f"{kind}: {error}"
    return {"type": kind, "coordinates": coords}, None
