//! Compiled fast path for `wildfire.connectors.firms.parse_firms_csv`.
//!
//! Contract: for a FIRMS area-API CSV in the plain, well-formed shape (every row valid, known column
//! names, no quoting, plain number text) `parse` returns exactly what the polars parser returns
//! (keys, wire JSON, acq_dates, dedup count). For anything else it returns `None` and the caller runs
//! the polars parser, which stays the reference and the only producer of dead letters. So every
//! check below errs on the side of "not handled here": a value the polars path would accept but that
//! needs re-formatting, trimming or case folding is declined, never approximated.
//!
//! Two passes: validation and derivation (pure Rust, the GIL released), then the Python objects of
//! the accepted rows (keys, wire JSON `bytes`, acq_dates; the GIL held). Single-threaded on purpose:
//! the goal is per core.

use std::collections::{HashMap, HashSet};

use ahash::RandomState;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

/// One column layout, resolved from the header. Indices are field positions in a line.
struct Layout {
    fields: usize,
    latitude: usize,
    longitude: usize,
    acq_date: usize,
    acq_time: usize,
    satellite: usize,
    confidence: usize,
    instrument: Option<usize>,
    daynight: Option<usize>,
    version: Option<usize>,
    scan: Option<usize>,
    track: Option<usize>,
    brightness: Option<usize>,
    brightness_2: Option<usize>,
    frp: Option<usize>,
    /// Columns the record does not use: only checked to be plain text.
    unused: Vec<usize>,
    instrument_default: &'static str,
}

/// What one response needs besides its bytes; the JSON fragments are escaped by the caller (orjson),
/// so this module never escapes anything itself.
struct Context<'a> {
    family: &'a [u8],
    /// `{"source":...,"kind":...,"key":"`
    head: &'a [u8],
    /// JSON string of the satellite source (`"VIIRS_NOAA21_NRT"`).
    satellite_source_json: &'a [u8],
    /// `:00Z","ingest_time":...,"priority":...,"schema_version":N}`
    tail: &'a [u8],
    satellites: HashMap<Vec<u8>, Vec<u8>>,
    confidence_classes: HashMap<Vec<u8>, Vec<u8>>,
    class_scores: HashMap<Vec<u8>, f64>,
    nadir_viirs: f64,
    nadir_modis: f64,
}

/// Derived once per distinct (acq_date, acq_time, satellite, instrument, daynight, version).
struct When {
    /// Index into the distinct key prefixes: rows with equal prefix strings share it, so two keys
    /// are equal exactly when (prefix id, rounded lat bits, rounded lon bits) are.
    prefix_id: u32,
    /// `family|satellite|instrument|acq_date|HHMM|`: the key up to the coordinates.
    prefix: Vec<u8>,
    is_modis: bool,
    /// JSON from `,"satellite_source":` to the end of the record.
    wire: Vec<u8>,
    /// The cursor's acq_date; one Python `str` per combination is made from it in pass 2.
    acq_date: String,
}

/// Derived once per distinct (confidence, scan, track, instrument is MODIS).
struct How {
    /// JSON from `,"quality":` up to the brightness value.
    wire: Vec<u8>,
}

const SAFE_PUNCT: &[u8] = b" ._-";

fn is_safe_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || SAFE_PUNCT.contains(&b)
}

/// A value the polars path takes as is: non-empty, only `[A-Za-z0-9 ._-]`, nothing to strip.
fn is_plain_token(v: &[u8]) -> bool {
    !v.is_empty() && v[0] != b' ' && v[v.len() - 1] != b' ' && v.iter().all(|&b| is_safe_byte(b))
}

/// The polars path's `_JSON_NUMBER`: `-?(0|[1-9][0-9]{0,14})(\.[0-9]{1,17})?`, the CSV number text
/// that is copied into the JSON unchanged.
fn is_plain_number(v: &[u8]) -> bool {
    let mut i = usize::from(v.first() == Some(&b'-'));
    let int_start = i;
    match v.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            while i < v.len() && v[i].is_ascii_digit() {
                i += 1;
            }
            if i - int_start > 15 {
                return false;
            }
        }
        _ => return false,
    }
    if i == v.len() {
        return true;
    }
    if v[i] != b'.' {
        return false;
    }
    let frac = &v[i + 1..];
    (1..=17).contains(&frac.len()) && frac.iter().all(u8::is_ascii_digit)
}

/// A plain number's value; the text is ASCII by construction and Rust's parser rounds correctly,
/// as the polars string -> Float64 cast does.
fn plain_value(v: &[u8]) -> Option<f64> {
    if !is_plain_number(v) {
        return None;
    }
    // SAFETY: is_plain_number admitted only ASCII digits, '-' and '.'.
    let text = unsafe { std::str::from_utf8_unchecked(v) };
    text.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// Appends `v` as polars' Float64 -> String cast writes it: the shortest round-trip digits, plain
/// notation for 1e-5 <= |v| < 1e16 with `.0` on integers, else `1.5e-7` / `1e+16`. That is ryu's
/// layout except for the `+` of a positive exponent.
fn push_f64(out: &mut Vec<u8>, v: f64) {
    let mut buf = ryu::Buffer::new();
    let text = buf.format_finite(v).as_bytes();
    match text.iter().position(|&b| b == b'e') {
        Some(e) if text.get(e + 1) != Some(&b'-') => {
            out.extend_from_slice(&text[..=e]);
            out.push(b'+');
            out.extend_from_slice(&text[e + 1..]);
        }
        _ => out.extend_from_slice(text),
    }
}

fn push_opt_f64(out: &mut Vec<u8>, v: Option<f64>) {
    match v {
        Some(x) => push_f64(out, x),
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends a value rounded by `polars_round(v, 10000.0)` exactly as [`push_f64`] would, from the
/// integer count of 1e-4 units: the double nearest m/10^4 (which the division gives) has that
/// decimal, trailing zeros trimmed, as its shortest round-trip text, and |v| <= 180 keeps it in plain
/// notation. About five times cheaper than the general formatter; the tests compare both with polars.
fn push_round4(out: &mut Vec<u8>, v: f64) {
    let units = (v * 10000.0).round_ties_even();
    if units.abs() >= 1e15 {
        return push_f64(out, polars_round(v, 10000.0));
    }
    if units.is_sign_negative() {
        out.push(b'-'); // -0.0 included: polars writes "-0.0"
    }
    let units = units.abs() as u64;
    let mut itoa = itoa::Buffer::new();
    out.extend_from_slice(itoa.format(units / 10000).as_bytes());
    out.push(b'.');
    let frac = units % 10000;
    if frac == 0 {
        out.push(b'0');
        return;
    }
    let digits = [frac / 1000, frac / 100 % 10, frac / 10 % 10, frac % 10];
    let len = 4 - digits.iter().rev().take_while(|&&d| d == 0).count();
    out.extend(digits[..len].iter().map(|&d| b'0' + d as u8));
}

/// polars `round(decimals)` on Float64 (round half to even after scaling by 10^decimals).
fn polars_round(v: f64, scale: f64) -> f64 {
    (v * scale).round_ties_even() / scale
}

fn digits(v: &[u8]) -> Option<u32> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u32, |acc, &b| acc * 10 + u32::from(b - b'0')))
}

/// `YYYY-MM-DD`, a real calendar day. Years before 1000 are left to polars (its date parser's
/// handling of them is not worth matching here).
fn valid_date(v: &[u8]) -> bool {
    if v.len() != 10 || v[4] != b'-' || v[7] != b'-' {
        return false;
    }
    let (Some(year), Some(month), Some(day)) = (digits(&v[..4]), digits(&v[5..7]), digits(&v[8..])) else {
        return false;
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    year >= 1000 && (1..=days).contains(&day)
}

/// `acq_time` (1-4 digits, HHMM without its leading zeros) -> zero-padded `HHMM`.
fn hhmm(v: &[u8]) -> Option<[u8; 4]> {
    if v.len() > 4 {
        return None;
    }
    let t = digits(v)?;
    if t / 100 > 23 || t % 100 > 59 {
        return None;
    }
    let mut out = *b"0000";
    out[4 - v.len()..].copy_from_slice(v);
    Some(out)
}

/// A JSON value for daynight/version: a plain token as a string, an empty field as null.
fn push_token_json(out: &mut Vec<u8>, v: Option<&[u8]>) -> Option<()> {
    match v {
        None | Some(b"") => out.extend_from_slice(b"null"),
        Some(t) if is_plain_token(t) => {
            out.push(b'"');
            out.extend_from_slice(t);
            out.push(b'"');
        }
        Some(_) => return None,
    }
    Some(())
}

fn is_column_name(v: &[u8]) -> bool {
    !v.is_empty()
        && v.iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Column positions from the header line, or None for any header the fast path does not take
/// (names needing trimming or lower-casing, duplicates, a required column missing).
fn layout(header: &[u8], landsat: bool) -> Option<Layout> {
    let names: Vec<&[u8]> = header.split(|&b| b == b',').collect();
    let unique: HashSet<&[u8]> = names.iter().copied().collect();
    if unique.len() != names.len() || !names.iter().all(|n| is_column_name(n)) {
        return None;
    }
    let find = |name: &str| names.iter().position(|n| *n == name.as_bytes());
    // The polars path takes the first of each pair that is present, in this order.
    let brightness = find("bright_ti4").or_else(|| find("brightness"))?;
    let known = [
        "latitude",
        "longitude",
        "acq_date",
        "acq_time",
        "satellite",
        "confidence",
        "instrument",
        "daynight",
        "version",
        "scan",
        "track",
        "bright_ti4",
        "brightness",
        "bright_ti5",
        "bright_t31",
        "frp",
    ];
    let instrument_default = if landsat {
        "OLI"
    } else if find("bright_ti4").is_some() {
        "VIIRS"
    } else {
        "MODIS"
    };
    Some(Layout {
        fields: names.len(),
        latitude: find("latitude")?,
        longitude: find("longitude")?,
        acq_date: find("acq_date")?,
        acq_time: find("acq_time")?,
        satellite: find("satellite")?,
        confidence: find("confidence")?,
        instrument: find("instrument"),
        daynight: find("daynight"),
        version: find("version"),
        scan: find("scan"),
        track: find("track"),
        brightness: Some(brightness),
        brightness_2: find("bright_ti5").or_else(|| find("bright_t31")),
        frp: find("frp"),
        unused: (0..names.len())
            .filter(|&i| !known.contains(&std::str::from_utf8(names[i]).unwrap_or("")))
            .collect(),
        instrument_default,
    })
}

/// An optional number column: empty -> `null`, plain number -> its text, anything else declined.
fn number_text<'a>(fields: &[&'a [u8]], col: Option<usize>) -> Option<&'a [u8]> {
    match col.map(|c| fields[c]) {
        None | Some(b"") => Some(b"null"),
        Some(v) if is_plain_number(v) => Some(v),
        Some(_) => None,
    }
}

/// [`number_text`] of a row pass 1 already validated.
fn checked_number_text<'a>(fields: &[&'a [u8]], col: Option<usize>) -> &'a [u8] {
    match col.map(|c| fields[c]) {
        None | Some(b"") => b"null",
        Some(v) => v,
    }
}

/// An optional column scaled to SI (km -> m for scan/track): empty -> None, else the scaled value.
fn scaled(fields: &[&[u8]], col: Option<usize>, factor: f64) -> Option<Option<f64>> {
    match col.map(|c| fields[c]) {
        None | Some(b"") => Some(None),
        Some(v) => Some(Some(plain_value(v)? * factor)),
    }
}

fn derive_when(
    ctx: &Context<'_>,
    lay: &Layout,
    fields: &[&[u8]],
    prefixes: &mut HashMap<Vec<u8>, u32, RandomState>,
) -> Option<When> {
    let date = fields[lay.acq_date];
    if !valid_date(date) {
        return None;
    }
    let time = hhmm(fields[lay.acq_time])?;
    let satellite = ctx.satellites.get(fields[lay.satellite])?;
    let instrument: Vec<u8> = match lay.instrument {
        Some(c) if is_plain_token(fields[c]) => fields[c].to_ascii_uppercase(),
        Some(_) => return None,
        None => lay.instrument_default.as_bytes().to_vec(),
    };
    let mut prefix = Vec::with_capacity(64);
    for part in [ctx.family, satellite, &instrument, date, &time] {
        prefix.extend_from_slice(part);
        prefix.push(b'|');
    }
    let next_id = prefixes.len() as u32;
    let prefix_id = *prefixes.entry(prefix.clone()).or_insert(next_id);

    let mut wire = Vec::with_capacity(256);
    wire.extend_from_slice(b",\"satellite_source\":");
    wire.extend_from_slice(ctx.satellite_source_json);
    for (name, value) in [
        (&b",\"satellite\":\""[..], &satellite[..]),
        (b"\",\"instrument\":\"", &instrument),
        (b"\",\"acq_date\":\"", date),
        (b"\",\"acq_time\":\"", &time),
    ] {
        wire.extend_from_slice(name);
        wire.extend_from_slice(value);
    }
    wire.extend_from_slice(b"\",\"daynight\":");
    push_token_json(&mut wire, lay.daynight.map(|c| fields[c]))?;
    wire.extend_from_slice(b",\"version\":");
    push_token_json(&mut wire, lay.version.map(|c| fields[c]))?;
    wire.extend_from_slice(b"},\"event_time\":\"");
    wire.extend_from_slice(date);
    wire.push(b'T');
    wire.extend_from_slice(&time[..2]);
    wire.push(b':');
    wire.extend_from_slice(&time[2..]);
    wire.extend_from_slice(ctx.tail);
    Some(When {
        prefix_id,
        prefix,
        is_modis: instrument == b"MODIS",
        wire,
        acq_date: std::str::from_utf8(date).ok()?.to_owned(),
    })
}

fn derive_how(ctx: &Context<'_>, lay: &Layout, fields: &[&[u8]], is_modis: bool) -> Option<How> {
    let raw = fields[lay.confidence];
    // A class word/letter exactly as the polars path's table spells it, else a 0-100 number.
    let (class, pct): (&[u8], Option<f64>) = match ctx.confidence_classes.get(raw) {
        Some(class) => (class, None),
        None => {
            let pct = plain_value(raw)?;
            let class: &[u8] = if pct < 30.0 {
                b"low"
            } else if pct < 80.0 {
                b"nominal"
            } else if pct <= 100.0 {
                b"high"
            } else {
                return None;
            };
            (class, Some(pct))
        }
    };
    let scan_m = scaled(fields, lay.scan, 1000.0)?;
    let track_m = scaled(fields, lay.track, 1000.0)?;
    // The quality score, in the polars path's order of operations (same IEEE results).
    let nadir = if is_modis { ctx.nadir_modis } else { ctx.nadir_viirs };
    let penalty = match (scan_m, track_m) {
        (Some(s), Some(t)) => ((s * t / 1e6 / nadir - 1.0) / 10.0).clamp(0.0, 0.3),
        _ => 0.0,
    };
    let conf_score = match pct {
        Some(p) => (p / 100.0).clamp(0.05, 1.0),
        None => *ctx.class_scores.get(class)?,
    };
    let quality = polars_round(conf_score * (1.0 - penalty), 1000.0);
    let mut wire = Vec::with_capacity(160);
    wire.extend_from_slice(b",\"quality\":");
    push_f64(&mut wire, quality);
    wire.extend_from_slice(b",\"payload\":{\"confidence_class\":\"");
    wire.extend_from_slice(class);
    wire.extend_from_slice(b"\",\"confidence_pct\":");
    push_opt_f64(&mut wire, pct);
    wire.extend_from_slice(b",\"scan_m\":");
    push_opt_f64(&mut wire, scan_m);
    wire.extend_from_slice(b",\"track_m\":");
    push_opt_f64(&mut wire, track_m);
    wire.extend_from_slice(b",\"brightness_k\":");
    Some(How { wire })
}

/// Interns small derived values by the raw text of their source fields (joined with ',', which no
/// field can contain); consecutive rows usually share it, so the previous one is checked first.
struct Interner<T> {
    index: HashMap<Vec<u8>, usize, RandomState>,
    items: Vec<T>,
    last_key: Vec<u8>,
    last: usize,
}

impl<T> Interner<T> {
    fn new() -> Self {
        Self {
            index: HashMap::with_hasher(RandomState::with_seeds(1, 2, 3, 4)),
            items: Vec::new(),
            last_key: Vec::new(),
            last: usize::MAX,
        }
    }

    fn get_or(&mut self, key: &[u8], derive: impl FnOnce() -> Option<T>) -> Option<usize> {
        if self.last != usize::MAX && self.last_key == key {
            return Some(self.last);
        }
        let ix = match self.index.get(key) {
            Some(&ix) => ix,
            None => {
                self.items.push(derive()?);
                self.index.insert(key.to_vec(), self.items.len() - 1);
                self.items.len() - 1
            }
        };
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        self.last = ix;
        Some(ix)
    }
}

fn join_fields(out: &mut Vec<u8>, fields: &[&[u8]], cols: &[Option<usize>]) {
    out.clear();
    for col in cols {
        if let Some(c) = col {
            out.extend_from_slice(fields[*c]);
        }
        out.push(b',');
    }
}

/// Splits `line` at commas into `fields`; false if the count differs from the header's.
///
/// Eight bytes at a time (SWAR): fields are ~5-10 bytes, too short for memchr's vector setup to pay,
/// and a byte loop was a tenth of the parse (measured).
fn split_line<'a>(line: &'a [u8], fields: &mut Vec<&'a [u8]>, expected: usize) -> bool {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const COMMAS: u64 = 0x2c2c_2c2c_2c2c_2c2c;
    fields.clear();
    let mut start = 0;
    let mut chunks = line.chunks_exact(8);
    let mut base = 0;
    for chunk in &mut chunks {
        let x = u64::from_le_bytes(chunk.try_into().expect("8 bytes")) ^ COMMAS;
        // High bit of each byte set exactly where that byte of x is zero (was a comma); no carries
        // cross bytes since (b & 0x7f) + 0x7f <= 0xfe.
        let mut mask = !(((x & LOW7).wrapping_add(LOW7)) | x | LOW7);
        while mask != 0 {
            let comma = base + (mask.trailing_zeros() / 8) as usize;
            fields.push(&line[start..comma]);
            start = comma + 1;
            mask &= mask - 1;
        }
        base += 8;
    }
    for (i, &b) in chunks.remainder().iter().enumerate() {
        if b == b',' {
            fields.push(&line[start..base + i]);
            start = base + i + 1;
        }
    }
    fields.push(&line[start..]);
    fields.len() == expected
}

/// Lines of `body` without their `\n` / `\r\n`; None if a line is empty or holds a lone `\r`.
fn lines(body: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::with_capacity(memchr::memchr_iter(b'\n', body).count() + 1);
    let mut start = 0;
    while start < body.len() {
        let end = memchr::memchr(b'\n', &body[start..]).map_or(body.len(), |i| start + i);
        let mut line = &body[start..end];
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        if line.is_empty() || memchr::memchr(b'\r', line).is_some() {
            return None;
        }
        out.push(line);
        start = end + 1;
    }
    Some(out)
}

/// Result handed back to Python: keys, wire values, acq_dates (aligned), rows dropped as duplicates.
type Parsed<'py> = (Bound<'py, PyList>, Bound<'py, PyList>, Bound<'py, PyList>, usize);

fn string_map(d: &Bound<'_, PyDict>) -> PyResult<HashMap<Vec<u8>, Vec<u8>>> {
    d.iter()
        .map(|(k, v)| Ok((k.extract::<String>()?.into_bytes(), v.extract::<String>()?.into_bytes())))
        .collect()
}

/// Parses one FIRMS CSV response; see the module docs for the contract. `start` skips a BOM without
/// the caller copying the body. The tables (`satellites`, `confidence_classes`, `class_scores`) and
/// the JSON fragments come from the Python module, so there is one definition of each.
#[pyfunction]
#[pyo3(signature = (data, start, family, landsat, head, satellite_source_json, tail, satellites,
                    confidence_classes, class_scores, nadir_viirs, nadir_modis, seen=None))]
#[allow(clippy::too_many_arguments)]
fn parse<'py>(
    py: Python<'py>,
    data: &[u8],
    start: usize,
    family: &str,
    landsat: bool,
    head: &str,
    satellite_source_json: &str,
    tail: &str,
    satellites: &Bound<'py, PyDict>,
    confidence_classes: &Bound<'py, PyDict>,
    class_scores: &Bound<'py, PyDict>,
    nadir_viirs: f64,
    nadir_modis: f64,
    seen: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<Parsed<'py>>> {
    let data = data.get(start..).unwrap_or_default();
    // Quoting, non-ASCII text and odd line ends change how a CSV reader splits or decodes fields:
    // all left to polars.
    if !data.is_ascii() || memchr::memchr(b'"', data).is_some() {
        return Ok(None);
    }
    let Some(header_end) = memchr::memchr(b'\n', data) else {
        return Ok(None);
    };
    let header = data[..header_end].strip_suffix(b"\r").unwrap_or(&data[..header_end]);
    let Some(lay) = layout(header, landsat) else {
        return Ok(None);
    };
    let Some(rows) = lines(&data[header_end + 1..]) else {
        return Ok(None);
    };
    if rows.is_empty() {
        return Ok(None);
    }
    let scores = class_scores
        .iter()
        .map(|(k, v)| Ok((k.extract::<String>()?.into_bytes(), v.extract::<f64>()?)))
        .collect::<PyResult<HashMap<_, _>>>()?;
    let ctx = Context {
        family: family.as_bytes(),
        head: head.as_bytes(),
        satellite_source_json: satellite_source_json.as_bytes(),
        tail: tail.as_bytes(),
        satellites: string_map(satellites)?,
        confidence_classes: string_map(confidence_classes)?,
        class_scores: scores,
        nadir_viirs,
        nadir_modis,
    };
    let seen = seen.filter(|s| !s.is_none());
    parse_rows(py, &ctx, &lay, &rows, seen)
}

/// What the first pass keeps of an accepted row for the second.
struct Row {
    when: u32,
    how: u32,
    /// As parsed; rounded where used (the key, the dedup identity).
    lat: f64,
    lon: f64,
}

/// Pass 1 of [`parse_rows`]: every row validated (None at the first doubt), the per-combination
/// parts derived once each, the rows to drop as repeats found. Pure Rust: runs without the GIL.
struct Validated {
    whens: Vec<When>,
    hows: Vec<How>,
    rows: Vec<Row>,
    /// Rows (ascending) whose key occurred on an earlier row.
    repeated: Vec<usize>,
}

fn validate(ctx: &Context<'_>, lay: &Layout, lines: &[&[u8]]) -> Option<Validated> {
    let when_cols = [
        Some(lay.acq_date),
        Some(lay.acq_time),
        Some(lay.satellite),
        lay.instrument,
        lay.daynight,
        lay.version,
    ];
    let how_cols = [Some(lay.confidence), lay.scan, lay.track];
    let mut whens: Interner<When> = Interner::new();
    let mut hows: Interner<How> = Interner::new();
    let mut prefixes: HashMap<Vec<u8>, u32, RandomState> = HashMap::with_hasher(RandomState::with_seeds(5, 6, 7, 8));
    let mut rows: Vec<Row> = Vec::with_capacity(lines.len());
    let mut fields: Vec<&[u8]> = Vec::with_capacity(lay.fields);
    let mut scratch = Vec::with_capacity(128);
    for &line in lines {
        if !split_line(line, &mut fields, lay.fields) {
            return None;
        }
        if lay
            .unused
            .iter()
            .any(|&c| fields[c].iter().any(|&b| b < b' ' || b == 0x7f))
        {
            return None;
        }
        join_fields(&mut scratch, &fields, &when_cols);
        let w = whens.get_or(&scratch, || derive_when(ctx, lay, &fields, &mut prefixes))?;
        let is_modis = whens.items[w].is_modis;
        join_fields(&mut scratch, &fields, &how_cols);
        scratch.push(u8::from(is_modis));
        let h = hows.get_or(&scratch, || derive_how(ctx, lay, &fields, is_modis))?;
        let lat = plain_value(fields[lay.latitude])?;
        let lon = plain_value(fields[lay.longitude])?;
        if lat.abs() > 90.0 || lon.abs() > 180.0 {
            return None;
        }
        for col in [lay.brightness, lay.brightness_2, lay.frp] {
            number_text(&fields, col)?;
        }
        rows.push(Row {
            when: w as u32,
            how: h as u32,
            lat,
            lon,
        });
    }
    let repeated = repeated_rows(&rows, &whens.items);
    Some(Validated {
        whens: whens.items,
        hows: hows.items,
        rows,
        repeated,
    })
}

fn parse_rows<'py>(
    py: Python<'py>,
    ctx: &Context<'_>,
    lay: &Layout,
    lines: &[&[u8]],
    seen: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<Parsed<'py>>> {
    // Pass 1 touches no Python object: other threads (an Airflow task's heartbeat) may run meanwhile.
    let Some(Validated {
        whens,
        hows,
        rows,
        repeated,
    }) = py.detach(|| validate(ctx, lay, lines))
    else {
        return Ok(None);
    };
    let acq_dates: Vec<Bound<'py, PyString>> = whens.iter().map(|w| PyString::new(py, &w.acq_date)).collect();
    let mut fields: Vec<&[u8]> = Vec::with_capacity(lay.fields);
    let mut keys: Vec<Bound<'py, PyAny>> = Vec::with_capacity(rows.len());
    let mut values: Vec<Bound<'py, PyAny>> = Vec::with_capacity(rows.len());
    let mut dates: Vec<Bound<'py, PyAny>> = Vec::with_capacity(rows.len());
    let mut key = Vec::with_capacity(96);
    let mut wire = Vec::with_capacity(1024);
    let mut duplicates = repeated.len();
    let mut skip = repeated.into_iter().peekable();

    // Pass 2: key and wire JSON of every row that is not a repeat, in input order.
    for (i, (row, &line)) in rows.iter().zip(lines).enumerate() {
        if skip.peek() == Some(&i) {
            skip.next();
            continue;
        }
        split_line(line, &mut fields, lay.fields);
        let when = &whens[row.when as usize];
        key.clear();
        key.extend_from_slice(&when.prefix);
        push_round4(&mut key, row.lat);
        key.push(b'|');
        push_round4(&mut key, row.lon);
        // SAFETY: ASCII by construction (validated tokens, digits and punctuation).
        let key_str = PyString::new(py, unsafe { std::str::from_utf8_unchecked(&key) });
        if let Some(seen) = seen {
            if seen.contains(&key_str)? {
                duplicates += 1;
                continue;
            }
        }
        wire.clear();
        wire.extend_from_slice(ctx.head);
        wire.extend_from_slice(&key);
        wire.extend_from_slice(b"\",\"lat\":");
        wire.extend_from_slice(fields[lay.latitude]);
        wire.extend_from_slice(b",\"lon\":");
        wire.extend_from_slice(fields[lay.longitude]);
        wire.extend_from_slice(&hows[row.how as usize].wire);
        wire.extend_from_slice(checked_number_text(&fields, lay.brightness));
        wire.extend_from_slice(b",\"brightness_2_k\":");
        wire.extend_from_slice(checked_number_text(&fields, lay.brightness_2));
        wire.extend_from_slice(b",\"frp_mw\":");
        wire.extend_from_slice(checked_number_text(&fields, lay.frp));
        wire.extend_from_slice(&when.wire);
        keys.push(key_str.into_any());
        values.push(PyBytes::new(py, &wire).into_any());
        dates.push(acq_dates[row.when as usize].clone().into_any());
    }
    Ok(Some((
        PyList::new(py, keys)?,
        PyList::new(py, values)?,
        PyList::new(py, dates)?,
        duplicates,
    )))
}

/// Rows (ascending) whose key already occurred on an earlier row; exact, first occurrence kept.
///
/// Equal keys <=> equal (prefix id, bits of the rounded lat, of the rounded lon): the shortest round-trip
/// text of a float is unique to its bits, and NaN cannot occur. A hash set over all rows cost a
/// cache miss per row (most of the parse time, measured); sorting the 64-bit hashes instead and
/// checking exactly only the rows whose hash occurs twice is several times cheaper.
fn repeated_rows(rows: &[Row], whens: &[When]) -> Vec<usize> {
    let state = RandomState::with_seeds(9, 10, 11, 12);
    let rounded = |v: f64| polars_round(v, 10000.0).to_bits();
    let identity = |r: &Row| (whens[r.when as usize].prefix_id, rounded(r.lat), rounded(r.lon));
    let hashes: Vec<u64> = rows.iter().map(|r| state.hash_one(identity(r))).collect();
    let mut sorted = hashes.clone();
    sorted.sort_unstable();
    let twice: HashSet<u64, RandomState> = sorted
        .windows(2)
        .filter(|p| p[0] == p[1])
        .map(|p| p[0])
        .collect::<HashSet<_, _>>();
    if twice.is_empty() {
        return Vec::new();
    }
    let mut first: HashSet<(u32, u64, u64), RandomState> = HashSet::with_hasher(state.clone());
    (0..rows.len())
        .filter(|&i| twice.contains(&hashes[i]) && !first.insert(identity(&rows[i])))
        .collect()
}

#[pymodule]
fn wildfire_firms_fast(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(parse, m)?)?;
    Ok(())
}
