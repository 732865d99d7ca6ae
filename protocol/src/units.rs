//! Parsing of the human units used in configuration: sizes ("64MiB") and
//! link rates ("800Mbit").

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
