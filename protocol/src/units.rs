//! Parsing of the human units used in configuration: sizes ("64MiB") and
//! link rates ("800Mbit").

use serde::de::{self, Deserializer, Visitor};

/// Deserializes a size key written either as a string with a unit
/// (`"64MiB"`) or as a plain integer of bytes (`67108864`), into the text
/// that [`parse_size`] reads. Use as
/// `#[serde(deserialize_with = "weir_protocol::units::size_text")]`.
pub fn size_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    struct SizeText;
    impl Visitor<'_> for SizeText {
        type Value = String;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a size: a number of bytes (65536) or a string with a unit (\"64MiB\")")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            u64::try_from(v)
                .map(|v| v.to_string())
                .map_err(|_| E::custom(format!("{v} is negative; a size is 0 or more bytes")))
        }
    }
    deserializer.deserialize_any(SizeText)
}

/// Parses a byte size: a plain number of bytes, or a number with one of
/// K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB (powers of 1024 for the binary
/// forms and the bare letters, 1000 for KB/MB/GB/TB).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size; write e.g. 65536, 64KiB, 256MiB, 1GiB"))?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KiB" | "k" => 1024.0,
        "M" | "MiB" => 1024.0 * 1024.0,
        "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "T" | "TiB" => 1024f64.powi(4),
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        other => {
            return Err(format!(
            "`{other}` in `{text}` is not a size unit; use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
        ))
        }
    };
    let v = num * mult;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(v.round() as u64)
}

/// Parses a link rate in bits per second: "800Mbit", "1Gbit", "10Gbit",
/// "500kbit", or a plain number of bits per second. Must be positive.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a rate; write e.g. 800Mbit, 1Gbit, 9.5Gbit"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "bit" | "bps" | "bit/s" => 1.0,
        "k" | "kbit" | "kbps" | "kbit/s" => 1e3,
        "m" | "mbit" | "mbps" | "mbit/s" => 1e6,
        "g" | "gbit" | "gbps" | "gbit/s" => 1e9,
        other => {
            return Err(format!(
                "`{other}` in `{text}` is not a rate unit; use bit, kbit, Mbit or Gbit"
            ))
        }
    };
    let v = num * mult;
    if !v.is_finite() || !(1000.0..=1e12).contains(&v) {
        return Err(format!("`{text}` must be between 1kbit and 1000Gbit"));
    }
    Ok(v.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_keys_accept_a_plain_integer_of_bytes_or_a_string_with_a_unit() {
        use serde::de::IntoDeserializer;
        type E = serde::de::value::Error;
        let int = size_text(IntoDeserializer::<E>::into_deserializer(1_048_576u64)).unwrap();
        assert_eq!(parse_size(&int), Ok(1 << 20));
        let int = size_text(IntoDeserializer::<E>::into_deserializer(65_536i64)).unwrap();
        assert_eq!(parse_size(&int), Ok(65_536));
        let text = size_text(IntoDeserializer::<E>::into_deserializer("64MiB")).unwrap();
        assert_eq!(parse_size(&text), Ok(64 << 20));
        let negative = size_text(IntoDeserializer::<E>::into_deserializer(-5i64)).unwrap_err();
        assert!(negative.to_string().contains("negative"), "{negative}");
        let wrong = size_text(IntoDeserializer::<E>::into_deserializer(true)).unwrap_err();
        assert!(wrong.to_string().contains("64MiB"), "{wrong}");
    }

    #[test]
    fn sizes_and_rates_parse_with_units() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1500"), Ok(1500));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert!(parse_size("12 parsecs").unwrap_err().contains("parsecs"));
        assert_eq!(parse_rate("800Mbit"), Ok(800_000_000));
        assert_eq!(parse_rate("9.5Gbit"), Ok(9_500_000_000));
        assert!(parse_rate("0Mbit").is_err());
        assert!(parse_rate("fast").unwrap_err().contains("800Mbit"));
    }
}
