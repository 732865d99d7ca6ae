//! Parsing of byte counts ("200M", "1G") and bit rates ("10Gbit").
//!
//! Byte suffixes are binary (K = KiB, M = MiB, G = GiB, T = TiB) because
//! test sizes are naturally powers of two; bit-rate suffixes are decimal
//! (Mbit = 10^6 bit/s) because link speeds are quoted that way.

use anyhow::{bail, Context, Result};

/// Splits "1.5Gbit" into ("1.5", "Gbit").
fn split_number(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(text.len());
    (&text[..end], &text[end..])
}

/// Multiplies a decimal number given as text by `scale`, exactly when the
/// number is an integer, and rounding to the nearest unit otherwise.
fn scaled(number: &str, scale: u64, original: &str) -> Result<u64> {
    let number = number.replace('_', "");
    if number.is_empty() {
        bail!("{original:?} does not start with a number");
    }
    if !number.contains('.') {
        let n: u64 = number
            .parse()
            .with_context(|| format!("{original:?}: {number:?} is not a whole number"))?;
        return n
            .checked_mul(scale)
            .with_context(|| format!("{original:?} is too large (overflows u64)"));
    }
    let n: f64 = number
        .parse()
        .with_context(|| format!("{original:?}: {number:?} is not a number"))?;
    let value = (n * scale as f64).round();
    if !value.is_finite() || value < 0.0 || value >= u64::MAX as f64 {
        bail!("{original:?} is out of range");
    }
    Ok(value as u64)
}

/// Parses a byte count: a plain number, or a number followed by K, M, G or T
/// (binary multiples), optionally spelled Ki/KiB/KB etc. Examples: "1500",
/// "64K", "200M", "1G", "1.5GiB".
pub fn parse_bytes(text: &str) -> Result<u64> {
    let trimmed = text.trim();
    let (number, suffix) = split_number(trimmed);
    let scale: u64 = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kb" | "kib" => 1 << 10,
        "m" | "mi" | "mb" | "mib" => 1 << 20,
        "g" | "gi" | "gb" | "gib" => 1 << 30,
        "t" | "ti" | "tb" | "tib" => 1 << 40,
        other => bail!(
            "{text:?}: unknown byte suffix {other:?}; use a plain number or K, M, G, T \
             (binary: 1M = 1048576 bytes)"
        ),
    };
    scaled(number, scale, text)
}

/// Parses a bit rate in bits per second: a plain number, or a number followed
/// by k/M/G/T and optionally "bit", "b" or "bps" (decimal multiples).
/// Examples: "1000000", "800Mbit", "10Gbit", "2.5G".
pub fn parse_bit_rate(text: &str) -> Result<u64> {
    let trimmed = text.trim();
    let (number, suffix) = split_number(trimmed);
    let lower = suffix.to_ascii_lowercase();
    let prefix = lower
        .strip_suffix("bps")
        .or_else(|| lower.strip_suffix("bit/s"))
        .or_else(|| lower.strip_suffix("bit"))
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let scale: u64 = match prefix {
        "" => 1,
        "k" => 1_000,
        "m" => 1_000_000,
        "g" => 1_000_000_000,
        "t" => 1_000_000_000_000,
        other => bail!(
            "{text:?}: unknown rate suffix {other:?}; use bits per second with k, M, G or T \
             (decimal), e.g. 800Mbit or 10Gbit"
        ),
    };
    scaled(number, scale, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_byte_counts_parse_exactly() {
        assert_eq!(parse_bytes("0").unwrap(), 0);
        assert_eq!(parse_bytes("1472").unwrap(), 1472);
        assert_eq!(parse_bytes(" 1_000 ").unwrap(), 1000);
        assert_eq!(parse_bytes("18446744073709551615").unwrap(), u64::MAX);
    }

    #[test]
    fn byte_suffixes_are_binary() {
        assert_eq!(parse_bytes("64K").unwrap(), 65536);
        assert_eq!(parse_bytes("64k").unwrap(), 65536);
        assert_eq!(parse_bytes("200M").unwrap(), 200 * 1024 * 1024);
        assert_eq!(parse_bytes("200MiB").unwrap(), 200 * 1024 * 1024);
        assert_eq!(parse_bytes("1G").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("1GB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("2T").unwrap(), 2 << 40);
        assert_eq!(parse_bytes("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("10B").unwrap(), 10);
    }

    #[test]
    fn bad_byte_counts_are_rejected() {
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("M").is_err());
        assert!(parse_bytes("12X").is_err());
        assert!(parse_bytes("-5").is_err());
        assert!(parse_bytes("1.2.3M").is_err());
        assert!(parse_bytes("99999999999T").is_err());
        assert!(parse_bytes("10Gbit").is_err());
    }

    #[test]
    fn bit_rates_are_decimal() {
        assert_eq!(parse_bit_rate("1000").unwrap(), 1000);
        assert_eq!(parse_bit_rate("10Gbit").unwrap(), 10_000_000_000);
        assert_eq!(parse_bit_rate("10gbit").unwrap(), 10_000_000_000);
        assert_eq!(parse_bit_rate("800Mbit").unwrap(), 800_000_000);
        assert_eq!(parse_bit_rate("800Mbps").unwrap(), 800_000_000);
        assert_eq!(parse_bit_rate("100kbit").unwrap(), 100_000);
        assert_eq!(parse_bit_rate("2.5G").unwrap(), 2_500_000_000);
        assert_eq!(parse_bit_rate("1Tbit/s").unwrap(), 1_000_000_000_000);
    }

    #[test]
    fn bad_bit_rates_are_rejected() {
        assert!(parse_bit_rate("").is_err());
        assert!(parse_bit_rate("Gbit").is_err());
        assert!(parse_bit_rate("10Xbit").is_err());
        assert!(parse_bit_rate("10MiB").is_err());
    }
}
