"""ERA5 on the real GRIB samples and on a larger ERA5-like file generated with ecCodes."""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from wildfire.connectors.era5 import (
    CDS_DATASET,
    build_cds_request,
    fosberg_ffwi,
    load_era5_file,
    open_era5,
    relative_humidity,
)
from wildfire.connectors.synthetic import write_era5_like_grib
from wildfire.records import Record

SAMPLES = Path(__file__).resolve().parents[3] / "include" / "samples" / "era5"
SCALAR = SAMPLES / "era5-single-level-scalar-time.grib"
MIXED = SAMPLES / "soil-surface-level-mix.grib"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "era5"
    d.mkdir()
    for f in (SCALAR, MIXED):
        shutil.copy(f, d / f.name)
    return d


def test_real_single_level_sample(data_dir: Path) -> None:
    result = load_era5_file(data_dir / SCALAR.name)
    assert result.summary.accepted == 121 * 201 == len(result.batch)
    rec = Record.from_json(result.batch.values[0])
    assert rec.key == "era5|2017-01-01T12|60.00|-10.00" and rec.kind == "era5_grid"
    assert rec.payload["temperature_c"] is not None and rec.payload["dewpoint_c"] is None
    assert rec.quality == pytest.approx(1 / 6, abs=1e-3)  # only t2m is in this file
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([SCALAR.name, MIXED.name])  # no .idx written


def test_real_mixed_level_sample_picks_t2m_from_its_hypercube(data_dir: Path) -> None:
    result = load_era5_file(data_dir / MIXED.name)
    assert len(result.batch) == 36
    values = [Record.from_json(v).payload["temperature_c"] for v in result.batch.values]
    assert all(v is not None and -60 < v < 60 for v in values)
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([SCALAR.name, MIXED.name])


def test_unreadable_file_is_a_dead_letter(tmp_path: Path) -> None:
    bad = tmp_path / "bad.grib"
    bad.write_bytes(b"GRIB but not really")
    result = load_era5_file(bad)
    assert len(result.batch) == 0 and result.summary.rejected == {"unreadable_grib": 1}
    assert result.dead_letters[0].reason == "unreadable_grib"


def test_generated_day_over_california(tmp_path: Path) -> None:
    path = write_era5_like_grib(SCALAR, tmp_path / "ca.grib", day=date(2024, 9, 6))
    grid = open_era5(path)
    assert grid.fields["t2m"].shape == (24, 39, 43)
    assert not any(np.isnan(a).any() for a in grid.fields.values())
    result = load_era5_file(path)
    assert result.summary.accepted == 24 * 39 * 43 == len(set(result.batch.keys))
    assert result.cursor == {"last_valid_time": "2024-09-06T23:00:00Z"}
    recs = [Record.from_json(v) for v in result.batch.values[::997]]
    for rec in recs:
        p = rec.payload
        t_c = p["temperature_c"]
        assert rec.quality == 1.0 and 32.5 <= rec.lat <= 42.0 and -124.5 <= rec.lon <= -114.0
        assert p["relative_humidity_pct"] == pytest.approx(
            float(relative_humidity(np.float64(t_c), np.float64(p["dewpoint_c"]))), abs=0.01
        )
        assert p["wind_speed_ms"] == pytest.approx(np.hypot(p["wind_u_ms"], p["wind_v_ms"]), abs=0.002)
        assert 0 <= p["wind_direction_deg"] < 360 and p["fosberg_ffwi"] >= 0
    assert len(list(tmp_path.iterdir())) == 1  # still no .idx


def test_meteorological_wind_direction_and_known_values() -> None:
    # A wind blowing from the north has v < 0: direction 0; from the west (u > 0): 270.
    from wildfire.connectors.era5 import Era5Grid, derive

    def grid(u: float, v: float) -> Era5Grid:
        one = np.ones((1, 1, 1))
        fields = {"t2m": one * 300.0, "d2m": one * 290.0, "u10": one * u, "v10": one * v, "sp": one, "tp": one}
        return Era5Grid(np.array(["2024-01-01T00"], dtype="datetime64[ns]"), np.zeros(1), np.zeros(1), fields)

    assert derive(grid(0.0, -5.0))["wind_direction_deg"].item() == pytest.approx(0.0)
    assert derive(grid(5.0, 0.0))["wind_direction_deg"].item() == pytest.approx(270.0)
    # Dewpoint equal to temperature is saturation.
    assert relative_humidity(np.float64(15.0), np.float64(15.0)) == pytest.approx(100.0)
    # Hand-computed FFWI: 80 F, 20 % RH, 10 mph -> m = 4.2472, eta = 0.7455, FFWI = 24.96.
    assert fosberg_ffwi(np.float64((80 - 32) * 5 / 9), np.float64(20.0), np.float64(10 / 2.23694)) == pytest.approx(
        24.96, abs=0.02
    )


def test_cds_request_is_the_real_dataset_and_fields() -> None:
    dataset, req = build_cds_request(date(2024, 9, 6))
    assert dataset == CDS_DATASET == "reanalysis-era5-single-levels"
    assert req["variable"] == [
        "2m_temperature", "2m_dewpoint_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind",
        "surface_pressure", "total_precipitation",
    ]
    assert req["year"] == ["2024"] and req["month"] == ["09"] and req["day"] == ["06"] and len(req["time"]) == 24
    assert req["area"] == [42.01, -124.48, 32.53, -114.13] and req["data_format"] == "grib"
    with pytest.raises(ValueError, match="unknown ERA5 variable"):
        build_cds_request(date(2024, 9, 6), variables=("swh",))


def test_download_uses_the_given_cdsapi_client(tmp_path: Path) -> None:
    from wildfire.connectors.era5 import download_era5

    calls = []

    class RecordingClient:  # stands in for cdsapi.Client: no network here
        def retrieve(self, dataset: str, request: dict, target: str) -> None:
            calls.append((dataset, request["day"], target))

    download_era5(tmp_path / "x.grib", date(2024, 9, 6), client=RecordingClient())
    assert calls == [(CDS_DATASET, ["06"], str(tmp_path / "x.grib"))]
