//! CPU time from /proc, for "how much CPU did this throughput cost".

use anyhow::{bail, Context, Result};

/// Linux reports utime/stime in USER_HZ ticks, which is 100 on every
/// architecture weir targets (it is fixed ABI, independent of CONFIG_HZ).
const USER_HZ: f64 = 100.0;

/// User + system CPU seconds from a /proc/.../stat file.
fn stat_cpu_seconds(path: &str) -> Result<f64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces and parentheses; the fields
    // after the last ')' are plain numbers. utime and stime are fields 14
    // and 15, i.e. the 12th and 13th after the name.
    let after = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .with_context(|| format!("{path}: no ')' after the command name"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    if fields.len() < 13 {
        bail!(
            "{path}: only {} fields after the command name",
            fields.len()
        );
    }
    let utime: u64 = fields[11]
        .parse()
        .with_context(|| format!("{path}: utime {:?}", fields[11]))?;
    let stime: u64 = fields[12]
        .parse()
        .with_context(|| format!("{path}: stime {:?}", fields[12]))?;
    Ok((utime + stime) as f64 / USER_HZ)
}

/// CPU seconds used so far by the whole process (all threads).
pub fn process_cpu_seconds() -> Result<f64> {
    stat_cpu_seconds("/proc/self/stat")
}

/// CPU seconds used so far by the calling thread.
pub fn thread_cpu_seconds() -> Result<f64> {
    stat_cpu_seconds("/proc/thread-self/stat")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_are_readable_and_grow() {
        let before = process_cpu_seconds().unwrap();
        let t0 = thread_cpu_seconds().unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed().as_millis() < 60 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(process_cpu_seconds().unwrap() >= before);
        assert!(thread_cpu_seconds().unwrap() >= t0);
    }
}
