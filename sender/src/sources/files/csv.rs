//! `csv` mode of the `files` source: each row of a CSV file becomes a
//! `Point` (tag, time, value, quality taken from named columns) instead of
//! the file crossing as a transfer.
//!
//! Parsing is pure (this module does no I/O): [`reader`] configures a
//! `csv::Reader` (RFC 4180 quoting, the configured delimiter), [`Mapping`]
//! finds the configured columns in the header, and [`Mapping::point`] turns
//! one row into a point or says, in words that name the column and the
//! value, why it cannot. The caller counts and logs bad rows with the file
//! name and line number; a bad row never stops the file.

use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime};
use serde::{Deserialize, Serialize};
use weir_protocol::{Point, Value, QUALITY_BAD, QUALITY_GOOD, QUALITY_UNCERTAIN};

/// `csv = { ... }` of a `files` source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvConfig {
    /// The column holding the point's tag.
    pub tag: String,
    /// The column holding its time; without it, points are stamped with
    /// the sender's clock when the row is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// How `time` is written: `rfc3339`, `unix` (seconds, a fraction
    /// allowed), `unix_ms`, `unix_us`, `unix_ns`, or a strftime pattern.
    #[serde(default = "default_time_format")]
    pub time_format: String,
    /// For a pattern without an offset (`%z`): the offset of its times,
    /// `+01:00`; default UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utc_offset: Option<String>,
    /// The column holding the value.
    pub value: String,
    /// How values are typed: `auto` (bool, then integer, then float, else
    /// string), `float`, `int`, `bool` or `string`.
    #[serde(default)]
    pub value_type: ValueType,
    /// The column holding the quality: `good`, `uncertain`, `bad` (any
    /// case) or `0`, `1`, `2`; an empty cell is good. Without it, every
    /// point is good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<String>,
    /// The field separator: one ASCII character.
    #[serde(default = "default_delimiter")]
    pub delimiter: String,
    /// Names of the columns for files without a header row (then every row
    /// is data); default: the first row is the header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
}

fn default_time_format() -> String {
    "rfc3339".into()
}

fn default_delimiter() -> String {
    ",".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    #[default]
    Auto,
    Float,
    Int,
    Bool,
    String,
}

/// `time_format`, understood.
#[derive(Debug, Clone, PartialEq)]
enum TimeFormat {
    Rfc3339,
    /// Unix time in units of 10^-digits seconds (0: seconds, a fraction
    /// allowed; 3: ms; 6: us; 9: ns).
    Unix(u32),
    /// A strftime pattern, and whether it holds an offset.
    Pattern(String, bool),
}

impl TimeFormat {
    fn parse(text: &str) -> Result<TimeFormat, String> {
        Ok(match text {
            "rfc3339" => TimeFormat::Rfc3339,
            "unix" => TimeFormat::Unix(0),
            "unix_ms" => TimeFormat::Unix(3),
            "unix_us" => TimeFormat::Unix(6),
            "unix_ns" => TimeFormat::Unix(9),
            pattern => {
                let items: Vec<Item> = StrftimeItems::new(pattern).collect();
                if items.iter().any(|i| matches!(i, Item::Error)) || !pattern.contains('%') {
                    return Err(format!(
                        "`{pattern}` is neither rfc3339, unix, unix_ms, unix_us, unix_ns nor a strftime pattern such as \"%Y-%m-%d %H:%M:%S\""
                    ));
                }
                let offset = pattern.contains("%z")
                    || pattern.contains("%:z")
                    || pattern.contains("%#z")
                    || pattern.contains("%::z");
                TimeFormat::Pattern(pattern.to_string(), offset)
            }
        })
    }
}

/// `+01:00`, `-05:30`, `Z`: seconds east of UTC.
fn parse_offset(text: &str) -> Result<i32, String> {
    let bad = || format!("`{text}` is not an offset; write e.g. \"+01:00\" or \"-05:30\"");
    if text == "Z" || text == "z" {
        return Ok(0);
    }
    let (sign, rest) = match text.as_bytes().first() {
        Some(b'+') => (1, &text[1..]),
        Some(b'-') => (-1, &text[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 || h < 0 || m < 0 {
        return Err(bad());
    }
    Ok(sign * (h * 3600 + m * 60))
}

impl CsvConfig {
    /// Checks the mapping; errors start with the key to fix.
    pub fn validate(&self) -> Result<(), String> {
        let format =
            TimeFormat::parse(&self.time_format).map_err(|e| format!("time_format: {e}"))?;
        if let Some(offset) = &self.utc_offset {
            parse_offset(offset).map_err(|e| format!("utc_offset: {e}"))?;
            if !matches!(format, TimeFormat::Pattern(_, false)) {
                return Err(
                    "utc_offset: only used with a time_format pattern without %z; leave it out"
                        .into(),
                );
            }
        }
        if self.delimiter.len() != 1 || !self.delimiter.is_ascii() {
            return Err(format!(
                "delimiter: `{}` must be one ASCII character, e.g. \",\" or \";\"",
                self.delimiter
            ));
        }
        let mut named = vec![("tag", &self.tag), ("value", &self.value)];
        named.extend(self.time.as_ref().map(|t| ("time", t)));
        named.extend(self.quality.as_ref().map(|q| ("quality", q)));
        for (key, column) in &named {
            if column.is_empty() {
                return Err(format!("{key}: name a column"));
            }
            if let Some(columns) = &self.columns {
                if !columns.contains(column) {
                    return Err(format!(
                        "{key}: column `{column}` is not in `columns` ({})",
                        columns.join(", ")
                    ));
                }
            }
        }
        for (i, (key, column)) in named.iter().enumerate() {
            if let Some((other, _)) = named[..i].iter().find(|(_, c)| c == column) {
                return Err(format!(
                    "{key}: column `{column}` is already the {other} column"
                ));
            }
        }
        Ok(())
    }
}

/// A reader for a CSV file as configured: RFC 4180 quoting, rows of any
/// length (a short row is a bad row, not the end of the file), the header
/// row read unless `columns` names the columns.
pub fn reader<R: std::io::Read>(cfg: &CsvConfig, input: R) -> csv::Reader<R> {
    csv::ReaderBuilder::new()
        .delimiter(cfg.delimiter.as_bytes()[0])
        .has_headers(cfg.columns.is_none())
        .flexible(true)
        .from_reader(input)
}

/// The configured columns found in one file's header.
#[derive(Debug, Clone)]
pub struct Mapping {
    tag: (usize, String),
    time: Option<(usize, String)>,
    value: (usize, String),
    quality: Option<(usize, String)>,
    format: TimeFormat,
    offset_s: i32,
    value_type: ValueType,
}

impl Mapping {
    /// Finds the columns in `header` (the file's first row, or `columns`).
    /// The error names the missing column and the columns there are.
    pub fn new(cfg: &CsvConfig, header: &csv::StringRecord) -> Result<Mapping, String> {
        let find = |key: &str, name: &str| {
            header
                .iter()
                .position(|h| h.trim() == name)
                .map(|i| (i, name.to_string()))
                .ok_or_else(|| {
                    format!(
                        "csv.{key}: column `{name}` is not in the header ({})",
                        header.iter().collect::<Vec<_>>().join(", ")
                    )
                })
        };
        Ok(Mapping {
            tag: find("tag", &cfg.tag)?,
            time: cfg.time.as_deref().map(|t| find("time", t)).transpose()?,
            value: find("value", &cfg.value)?,
            quality: cfg
                .quality
                .as_deref()
                .map(|q| find("quality", q))
                .transpose()?,
            format: TimeFormat::parse(&cfg.time_format)
                .map_err(|e| format!("csv.time_format: {e}"))?,
            offset_s: cfg
                .utc_offset
                .as_deref()
                .map(parse_offset)
                .transpose()
                .map_err(|e| format!("csv.utc_offset: {e}"))?
                .unwrap_or(0),
            value_type: cfg.value_type,
        })
    }

    /// One row as a point; `now_ns` stamps it when no time column is
    /// configured. The error says which column holds what.
    pub fn point(&self, row: &csv::StringRecord, now_ns: i64) -> Result<Point, String> {
        let field = |(i, name): &(usize, String)| {
            row.get(*i).ok_or_else(|| {
                format!(
                    "the row has {} field(s); column `{name}` is field {}",
                    row.len(),
                    i + 1
                )
            })
        };
        let tag = field(&self.tag)?.trim();
        if tag.is_empty() {
            return Err(format!("tag column `{}` is empty", self.tag.1));
        }
        let ts_ns = match &self.time {
            Some(col) => parse_time(field(col)?.trim(), &self.format, self.offset_s)
                .map_err(|e| format!("time column `{}`: {e}", col.1))?,
            None => now_ns,
        };
        let value = parse_value(field(&self.value)?, self.value_type)
            .map_err(|e| format!("value column `{}`: {e}", self.value.1))?;
        let quality = match &self.quality {
            Some(col) => parse_quality(field(col)?.trim())
                .map_err(|e| format!("quality column `{}`: {e}", col.1))?,
            None => QUALITY_GOOD,
        };
        Ok(Point {
            tag: tag.to_string(),
            ts_ns,
            value,
            quality,
            status: None,
        })
    }
}

/// A time as `format` writes it, in nanoseconds since the Unix epoch.
fn parse_time(text: &str, format: &TimeFormat, offset_s: i32) -> Result<i64, String> {
    let out_of_range = || format!("`{text}` is outside the years 1677 to 2262");
    match format {
        TimeFormat::Rfc3339 => DateTime::parse_from_rfc3339(text)
            .map_err(|e| {
                format!("`{text}` is not an RFC 3339 time ({e}); e.g. 2026-03-01T12:00:00Z")
            })?
            .timestamp_nanos_opt()
            .ok_or_else(out_of_range),
        TimeFormat::Unix(digits) => parse_unix(text, *digits),
        TimeFormat::Pattern(pattern, true) => DateTime::parse_from_str(text, pattern)
            .map_err(|e| format!("`{text}` does not match `{pattern}` ({e})"))?
            .timestamp_nanos_opt()
            .ok_or_else(out_of_range),
        TimeFormat::Pattern(pattern, false) => {
            let naive = match NaiveDateTime::parse_from_str(text, pattern) {
                Ok(t) => t,
                // A pattern with a date and no time of day: midnight.
                Err(e) if e.kind() == chrono::format::ParseErrorKind::NotEnough => {
                    NaiveDate::parse_from_str(text, pattern)
                        .map_err(|e| format!("`{text}` does not match `{pattern}` ({e})"))?
                        .and_hms_opt(0, 0, 0)
                        .expect("midnight exists")
                }
                Err(e) => return Err(format!("`{text}` does not match `{pattern}` ({e})")),
            };
            let offset = FixedOffset::east_opt(offset_s).expect("validated offset");
            naive
                .and_local_timezone(offset)
                .single()
                .expect("a fixed offset is never ambiguous")
                .timestamp_nanos_opt()
                .ok_or_else(out_of_range)
        }
    }
}

/// Unix time: an integer in 10^-digits seconds, or (digits = 0) seconds
/// with an optional fraction of up to 9 digits. Exact: no float rounding.
fn parse_unix(text: &str, digits: u32) -> Result<i64, String> {
    let bad = || {
        format!(
            "`{text}` is not a unix time (an integer{})",
            if digits == 0 {
                ", a fraction allowed"
            } else {
                ""
            }
        )
    };
    let out_of_range = || format!("`{text}` is outside the years 1677 to 2262");
    let (int, frac) = match text.split_once('.') {
        Some((i, f)) if digits == 0 => (i, f),
        Some(_) => return Err(bad()),
        None => (text, ""),
    };
    let negative = int.starts_with('-');
    let whole: i64 = int.parse().map_err(|_| bad())?;
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let frac_ns: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().map_err(|_| bad())?
    };
    let scale = 10i64.pow(9 - digits);
    let ns = whole.checked_mul(scale).ok_or_else(out_of_range)?;
    if negative {
        ns.checked_sub(frac_ns)
    } else {
        ns.checked_add(frac_ns)
    }
    .ok_or_else(out_of_range)
}

fn parse_value(raw: &str, ty: ValueType) -> Result<Value, String> {
    let text = raw.trim();
    if text.is_empty() && ty != ValueType::String {
        return Err("empty".into());
    }
    let as_bool = |t: &str| match t.to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    };
    Ok(match ty {
        ValueType::String => Value::Str(raw.to_string()),
        ValueType::Bool => {
            Value::Bool(as_bool(text).ok_or_else(|| format!("`{text}` is not true or false"))?)
        }
        ValueType::Int => Value::I64(
            text.parse()
                .map_err(|_| format!("`{text}` is not a 64-bit integer"))?,
        ),
        ValueType::Float => Value::F64(
            text.parse()
                .map_err(|_| format!("`{text}` is not a number"))?,
        ),
        ValueType::Auto => {
            if let Some(b) = as_bool(text) {
                Value::Bool(b)
            } else if let Ok(i) = text.parse::<i64>() {
                Value::I64(i)
            } else if let Some(f) = text.parse::<f64>().ok().filter(|f| f.is_finite()) {
                Value::F64(f)
            } else {
                Value::Str(raw.to_string())
            }
        }
    })
}

fn parse_quality(text: &str) -> Result<u8, String> {
    match text.to_ascii_lowercase().as_str() {
        "" | "good" | "0" => Ok(QUALITY_GOOD),
        "uncertain" | "1" => Ok(QUALITY_UNCERTAIN),
        "bad" | "2" => Ok(QUALITY_BAD),
        _ => Err(format!(
            "`{text}` is not a quality; write good, uncertain or bad (or 0, 1, 2)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CsvConfig {
        CsvConfig {
            tag: "tag".into(),
            time: Some("time".into()),
            time_format: "rfc3339".into(),
            utc_offset: None,
            value: "value".into(),
            value_type: ValueType::Auto,
            quality: Some("quality".into()),
            delimiter: ",".into(),
            columns: None,
        }
    }

    /// Every row of `text` as a point or an error with its line number.
    fn rows(cfg: &CsvConfig, text: &str) -> Vec<(u64, Result<Point, String>)> {
        let mut r = reader(cfg, text.as_bytes());
        let header = match &cfg.columns {
            Some(c) => csv::StringRecord::from(c.clone()),
            None => r.headers().unwrap().clone(),
        };
        let m = Mapping::new(cfg, &header).unwrap();
        let mut out = Vec::new();
        let mut row = csv::StringRecord::new();
        loop {
            match r.read_record(&mut row) {
                Ok(false) => return out,
                Ok(true) => {
                    let line = row.position().map_or(0, |p| p.line());
                    out.push((line, m.point(&row, 7)));
                }
                Err(e) => {
                    let line = e.position().map_or(0, |p| p.line());
                    out.push((line, Err(e.to_string())));
                }
            }
        }
    }

    fn ok(p: &(u64, Result<Point, String>)) -> &Point {
        p.1.as_ref().unwrap()
    }

    #[test]
    fn good_rows_become_points_with_typed_values_times_and_qualities() {
        let text = "time,tag,value,quality\n\
                    2026-03-01T12:00:00Z,boiler/temp,81.5,good\n\
                    2026-03-01T12:00:01.250+01:00,boiler/run,TRUE,Uncertain\n\
                    2026-03-01T12:00:02Z,boiler/trips,-42,2\n\
                    2026-03-01T12:00:03Z,boiler/state,heating up,\n";
        let got = rows(&cfg(), text);
        assert_eq!(got.len(), 4);
        let p = ok(&got[0]);
        assert_eq!(p.tag, "boiler/temp");
        assert_eq!(p.ts_ns, 1_772_366_400_000_000_000);
        assert_eq!(
            (p.value.clone(), p.quality),
            (Value::F64(81.5), QUALITY_GOOD)
        );
        let p = ok(&got[1]);
        assert_eq!(
            p.ts_ns,
            1_772_366_400_000_000_000 - 3_600_000_000_000 + 1_250_000_000
        );
        assert_eq!(
            (p.value.clone(), p.quality),
            (Value::Bool(true), QUALITY_UNCERTAIN)
        );
        assert_eq!(
            (ok(&got[2]).value.clone(), ok(&got[2]).quality),
            (Value::I64(-42), QUALITY_BAD)
        );
        assert_eq!(ok(&got[3]).value, Value::Str("heating up".into()));
        assert_eq!(
            ok(&got[3]).quality,
            QUALITY_GOOD,
            "an empty quality cell is good"
        );
        assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>(), [2, 3, 4, 5]);
    }

    #[test]
    fn bad_rows_are_errors_naming_the_column_and_the_value_and_the_rest_still_parse() {
        let text = "time,tag,value,quality\n\
                    yesterday,a,1,good\n\
                    2026-03-01T12:00:00Z,,1,good\n\
                    2026-03-01T12:00:00Z,a,,good\n\
                    2026-03-01T12:00:00Z,a,1,excellent\n\
                    2026-03-01T12:00:00Z,a\n\
                    2026-03-01T12:00:00Z,a,2,good\n";
        let got = rows(&cfg(), text);
        let errs: Vec<(u64, String)> = got
            .iter()
            .filter_map(|(l, r)| r.as_ref().err().map(|e| (*l, e.clone())))
            .collect();
        assert_eq!(errs.len(), 5, "{errs:?}");
        assert_eq!(errs[0].0, 2);
        assert!(
            errs[0]
                .1
                .starts_with("time column `time`: `yesterday` is not an RFC 3339 time"),
            "{}",
            errs[0].1
        );
        assert_eq!(errs[1].1, "tag column `tag` is empty");
        assert_eq!(errs[2].1, "value column `value`: empty");
        assert!(
            errs[3].1.contains("`excellent` is not a quality"),
            "{}",
            errs[3].1
        );
        assert_eq!(
            (errs[4].0, errs[4].1.as_str()),
            (6, "the row has 2 field(s); column `value` is field 3")
        );
        assert_eq!(
            ok(&got[5]).value,
            Value::I64(2),
            "the row after bad ones parses"
        );
    }

    #[test]
    fn quoted_fields_keep_delimiters_quotes_and_newlines_and_line_numbers_stay_right() {
        let mut c = cfg();
        c.delimiter = ";".into();
        c.quality = None;
        let text = "tag;time;value\n\
                    \"line;1\";2026-03-01T12:00:00Z;\"says \"\"hi\"\"\"\n\
                    \"multi\nline\";2026-03-01T12:00:00Z;\"a;b\"\n\
                    after;2026-03-01T12:00:00Z;3.25\n";
        let got = rows(&c, text);
        assert_eq!(ok(&got[0]).tag, "line;1");
        assert_eq!(ok(&got[0]).value, Value::Str("says \"hi\"".into()));
        assert_eq!(ok(&got[1]).tag, "multi\nline");
        assert_eq!(ok(&got[1]).value, Value::Str("a;b".into()));
        assert_eq!(ok(&got[2]).value, Value::F64(3.25));
        assert_eq!(
            got.iter().map(|r| r.0).collect::<Vec<_>>(),
            [2, 3, 5],
            "a quoted newline counts as a line"
        );
    }

    #[test]
    fn a_configured_value_type_and_time_formats_are_applied() {
        let mut c = cfg();
        c.value_type = ValueType::Float;
        c.time_format = "unix".into();
        let got = rows(
            &c,
            "time,tag,value,quality\n1700000000.5,a,7,good\n-1.25,a,x,good\n",
        );
        assert_eq!(ok(&got[0]).value, Value::F64(7.0));
        assert_eq!(ok(&got[0]).ts_ns, 1_700_000_000_500_000_000);
        assert!(got[1]
            .1
            .as_ref()
            .unwrap_err()
            .contains("`x` is not a number"));
        assert_eq!(parse_unix("-1.25", 0), Ok(-1_250_000_000));
        assert_eq!(
            parse_unix("1700000000123", 3),
            Ok(1_700_000_000_123_000_000)
        );
        assert!(parse_unix("1.5", 3).is_err());
        assert!(parse_unix("99999999999999999", 0)
            .unwrap_err()
            .contains("outside"));
        c.value_type = ValueType::String;
        c.time_format = "%d.%m.%Y %H:%M:%S".into();
        c.utc_offset = Some("+01:00".into());
        assert!(c.validate().is_ok());
        let got = rows(
            &c,
            "time,tag,value,quality\n01.03.2026 13:00:00,a, 7 ,good\n",
        );
        assert_eq!(ok(&got[0]).ts_ns, 1_772_366_400_000_000_000);
        assert_eq!(ok(&got[0]).value, Value::Str(" 7 ".into()));
        c.time_format = "%Y-%m-%d".into();
        c.utc_offset = None;
        let got = rows(&c, "time,tag,value,quality\n2026-03-01,a,x,good\n");
        assert_eq!(
            ok(&got[0]).ts_ns,
            1_772_323_200_000_000_000,
            "a date alone is midnight"
        );
    }

    #[test]
    fn without_a_header_the_columns_key_names_them_and_without_time_the_clock_stamps() {
        let mut c = cfg();
        c.columns = Some(vec!["tag".into(), "value".into()]);
        c.time = None;
        c.quality = None;
        let got = rows(&c, "a,1\nb,2\n");
        assert_eq!(got.len(), 2, "the first row is data");
        assert_eq!((ok(&got[1]).tag.as_str(), ok(&got[1]).ts_ns), ("b", 7));
    }

    #[test]
    fn a_missing_column_and_a_bad_mapping_are_named() {
        let e =
            Mapping::new(&cfg(), &csv::StringRecord::from(vec!["time", "tag", "val"])).unwrap_err();
        assert_eq!(
            e,
            "csv.value: column `value` is not in the header (time, tag, val)"
        );
        let bad = |f: fn(&mut CsvConfig), key: &str| {
            let mut c = cfg();
            f(&mut c);
            let e = c.validate().unwrap_err();
            assert!(e.starts_with(key), "{e}");
        };
        bad(|c| c.time_format = "yyyy-mm-dd".into(), "time_format:");
        bad(|c| c.utc_offset = Some("+01:00".into()), "utc_offset:");
        bad(|c| c.delimiter = "||".into(), "delimiter:");
        bad(|c| c.value = "tag".into(), "value:");
        bad(|c| c.columns = Some(vec!["tag".into()]), "value:");
        let mut c = cfg();
        c.time_format = "%Y-%m-%d %H:%M".into();
        c.utc_offset = Some("1h".into());
        assert!(c.validate().unwrap_err().starts_with("utc_offset:"));
    }
}
