"""EPA's Fire and Smoke Map correction of PurpleAir PM2.5 against reference values worked out by hand.

Every expected value below was computed from the published formula (Barkjohn et al. 2022, Sensors 22, 9669;
EPA's October 2021 correction) with pencil arithmetic, not with the code under test; the working is in the
comment beside each row. Inside each segment, at every boundary (from both sides), and in heavy smoke.
"""

from __future__ import annotations

import pytest

from wildfire.connectors.epa import CORRECTION, channels_agree, correct_pm25

# (PA = mean of channels, RH %, expected ug/m3)
REFERENCE = [
    (10.0, 50.0, 6.68),          # 0.524*10 - 0.0862*50 + 5.75 = 5.24 - 4.31 + 5.75
    (29.999, 50.0, 17.159476),   # 0.524*29.999 = 15.719476 -> 15.719476 - 4.31 + 5.75
    (30.0, 50.0, 17.16),         # boundary: s = 0 -> 0.524*30 = 15.72; 15.72 - 4.31 + 5.75
    (40.0, 50.0, 27.64),         # s = 0.5: (0.393 + 0.262)*40 = 26.2; 26.2 - 4.31 + 5.75
    (50.0, 50.0, 40.74),         # boundary: 0.786*50 = 39.3; 39.3 - 4.31 + 5.75
    (100.0, 30.0, 81.764),       # 78.6 - 2.586 + 5.75
    (210.0, 50.0, 166.5),        # boundary: 0.786*210 = 165.06; 165.06 - 4.31 + 5.75
    (235.0, 40.0, 200.47345),    # s = 0.5: 0.738*235 = 173.43; -1.724; +1.483; +2.875; 8.84e-4*55225*0.5 = 24.40945
    (260.0, 50.0, 242.1244),     # boundary: 2.966 + 179.4 + 8.84e-4*67600 (= 59.7584)
    (300.0, 40.0, 289.526),      # heavy smoke: 2.966 + 207 + 79.56 (the linear 2021 fit gives ~160)
    (300.0, 90.0, 289.526),      # no humidity term in smoke
    (570.0, 40.0, 683.4776),     # 2.966 + 393.3 + 8.84e-4*324900 (= 287.2116); the old fit stopped here
    (1000.0, 20.0, 1576.966),    # 2.966 + 690 + 884
    (0.0, 90.0, 0.0),            # 5.75 - 7.758 < 0: floored at 0
]


@pytest.mark.parametrize(("pa", "rh", "expected"), REFERENCE)
def test_reference_values(pa: float, rh: float, expected: float) -> None:
    out = correct_pm25(pa, pa, rh)
    assert out.qa == "ok" and out.pa == pytest.approx(pa)
    assert out.value == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("boundary", [30.0, 50.0, 210.0, 260.0])
def test_continuous_at_every_boundary(boundary: float) -> None:
    below = correct_pm25(boundary - 1e-9, boundary - 1e-9, 45.0).value
    at = correct_pm25(boundary, boundary, 45.0).value
    assert below == pytest.approx(at, abs=1e-6)


def test_the_mean_of_the_channels_is_corrected() -> None:
    out = correct_pm25(280.0, 320.0, 40.0)  # agree: |40| > 5 but 40/300 = 13 % <= 70 %
    assert out.pa == 300.0 and out.value == pytest.approx(289.526)


@pytest.mark.parametrize(("a", "b", "agree"), [
    (4.0, 1.0, True),      # differ by 3 <= 5 ug/m3
    (10.0, 15.0, True),    # differ by exactly 5
    (8.0, 2.0, False),     # differ by 6 > 5 and 6/5 = 120 % > 70 %
    (300.0, 200.0, True),  # differ by 100 > 5 but 100/250 = 40 % <= 70 %
    (100.0, 20.0, False),  # 80 > 5 and 80/60 = 133 % > 70 %
    (27.0, 13.0, True),    # 14 > 5 but 14/20 = 70 %, not more
])
def test_channel_agreement(a: float, b: float, agree: bool) -> None:
    assert channels_agree(a, b) is agree
    out = correct_pm25(a, b, 40.0)
    assert (out.qa == "ok") is agree and (out.value is not None) is agree


@pytest.mark.parametrize(("a", "b", "rh", "qa"), [
    (100.0, 20.0, 40.0, "channels_disagree"),
    (None, 20.0, 40.0, "one_channel"),
    (None, None, 40.0, "no_channels"),
    (20.0, 20.0, None, "no_humidity"),
    (-3.0, 20.0, 40.0, "negative"),
])
def test_failed_qa_gives_no_value_and_names_why(a, b, rh, qa) -> None:
    out = correct_pm25(a, b, rh)
    assert out.value is None and out.qa == qa


def test_correction_is_named_with_its_version() -> None:
    assert CORRECTION == "epa_fire_smoke_map_2021-10"
