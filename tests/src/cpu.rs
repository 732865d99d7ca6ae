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

/// User + system CPU seconds of another process so far (all its threads).
pub fn pid_cpu_seconds(pid: u32) -> Result<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// `VmHWM` (peak resident set size, KiB) from the text of a
/// /proc/PID/status file.
pub fn vm_hwm_kib(status: &str) -> Result<u64> {
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM line in the status file (a kernel thread, or not Linux?)")?;
    let mut fields = line.split_whitespace().skip(1);
    let (value, unit) = (fields.next(), fields.next());
    if unit != Some("kB") {
        bail!("VmHWM line {line:?}: expected a value in kB");
    }
    value
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("VmHWM line {line:?}: no number"))
}

/// Peak resident memory of a running process, in KiB.
pub fn pid_peak_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    vm_hwm_kib(&text).with_context(|| path.clone())
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
    fn peak_rss_is_read_from_vm_hwm_in_kib() {
        let status =
            "Name:\tweir-receiver\nVmPeak:\t  900000 kB\nVmHWM:\t   81234 kB\nVmRSS:\t 70000 kB\n";
        assert_eq!(vm_hwm_kib(status).unwrap(), 81_234);
        assert!(vm_hwm_kib("Name:\tx\n").is_err());
        assert!(vm_hwm_kib("VmHWM:\t12 MB\n").is_err());
        let own = pid_peak_rss_kib(std::process::id()).unwrap();
        assert!(own > 0);
        assert!(pid_cpu_seconds(std::process::id()).unwrap() >= 0.0);
    }

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
