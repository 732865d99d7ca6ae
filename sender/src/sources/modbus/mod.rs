//! `modbus`: polls a Modbus TCP device (through tokio-modbus) every
//! `interval` and turns its register map into `Point` records: one per
//! value per poll, stamped with the sender's clock when the answer came.
//!
//! The map is read in as few requests as the protocol allows ([`map::plan`]:
//! adjacent entries of a table joined up to 125 registers or 2000 bits).
//! A request that fails makes bad-quality points for the entries it
//! carried, with `status` saying why (`modbus exception 0x02 (illegal data
//! address)`, `timeout`, `malformed answer: ...`, `communication-lost: ...`),
//! and the other requests of the poll go on. The poll loop never stops:
//! after a timeout or a malformed answer the connection is dropped (a late
//! or misframed answer must not be taken for the next one) and made again
//! for the next request; a device that cannot be reached is tried again
//! with a backoff. The device's state (`connected`, `retrying`) and its
//! counts show in the source's status in the metrics file.

pub mod map;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::{ExceptionCode, Slave};
use weir_protocol::{Point, RecordBody, Value, QUALITY_BAD, QUALITY_GOOD};

use super::{now_ns, Source, SourceHandle};
use crate::metrics::Counters;
use map::{Answer, Kind, Register, Request};

/// Reconnect backoff after a failed connect: doubled per failure in a row
/// up to `RECONNECT_MAX`, so a device that is down costs one connection
/// attempt every few seconds, not one per poll.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The device: `host:port` (Modbus TCP's port is 502).
    pub address: String,
    /// The unit (slave) id; 255 or 0 for most plain TCP devices, a
    /// gateway's serial device id behind it.
    #[serde(default = "default_unit")]
    pub unit: u8,
    /// Time between the starts of two polls: `500ms`, `1s`, `1m`.
    #[serde(default = "default_interval")]
    pub interval: String,
    /// How long one request (and a connection attempt) may take.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// The register map.
    pub registers: Vec<Register>,
}

fn default_unit() -> u8 {
    1
}

fn default_interval() -> String {
    "1s".into()
}

fn default_timeout() -> String {
    "1s".into()
}

/// Parses `250ms`, `1s`, `2m`, `1h` (a whole number and a unit).
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a duration; write e.g. 500ms, 1s or 1m"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        other => {
            return Err(format!(
                "`{other}` in `{text}` is not a unit; use ms, s, m or h"
            ))
        }
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("`{text}` is too long"))
}

/// `host:port` of `address`, checked.
fn check_address(address: &str) -> Result<(), String> {
    let bad = || {
        format!("address: `{address}` must be host:port, e.g. \"192.0.2.20:502\" or \"plc1:502\"")
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p != 0 && !host.is_empty() => Ok(()),
        _ => Err(bad()),
    }
}

impl Source for Config {
    const TYPE: &'static str = "modbus";

    fn validate(&self) -> Result<(), String> {
        check_address(&self.address)?;
        let interval = parse_interval(&self.interval).map_err(|e| format!("interval: {e}"))?;
        if !(Duration::from_millis(10)..=Duration::from_secs(86_400)).contains(&interval) {
            return Err(format!(
                "interval: {} must be between 10ms and 24h",
                self.interval
            ));
        }
        let timeout = parse_interval(&self.timeout).map_err(|e| format!("timeout: {e}"))?;
        if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&timeout) {
            return Err(format!(
                "timeout: {} must be between 10ms and 60s",
                self.timeout
            ));
        }
        if self.registers.is_empty() {
            return Err(
                "registers: is empty; add [[sources.registers]] entries (tag, kind, address, type)"
                    .into(),
            );
        }
        let mut tags = std::collections::HashSet::new();
        for (i, r) in self.registers.iter().enumerate() {
            r.check()
                .map_err(|e| format!("registers[{i}] ({}).{e}", r.tag))?;
            for v in 0..r.values() {
                let tag = r.tag_of(v);
                if !tags.insert(tag.clone()) {
                    return Err(format!(
                        "registers[{i}].tag: `{tag}` is used twice; each point needs its own tag"
                    ));
                }
            }
        }
        Ok(())
    }

    async fn run(self, handle: SourceHandle) -> anyhow::Result<()> {
        run(self, handle).await
    }
}

/// How one request ended.
#[derive(Debug)]
enum Outcome {
    Answer(Answer),
    Exception(ExceptionCode),
    /// The request was not answered usably: the points' status.
    Failed(String),
}

/// The status of points the device refused with an exception.
fn exception_status(code: ExceptionCode) -> String {
    let number = u8::from(code);
    let name = match number {
        0x01 => "illegal function",
        0x02 => "illegal data address",
        0x03 => "illegal data value",
        0x04 => "server device failure",
        0x05 => "acknowledge",
        0x06 => "server device busy",
        0x08 => "memory parity error",
        0x0A => "gateway path unavailable",
        0x0B => "gateway target device failed to respond",
        _ => "unknown exception",
    };
    format!("modbus exception 0x{number:02X} ({name})")
}

/// The connection to the device and what the source counts about it.
struct Device {
    address: String,
    unit: u8,
    timeout: Duration,
    context: Option<Context>,
    /// No connection attempt before this (backoff after a failed one).
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Why the last connection attempt failed, while in backoff.
    down: Option<String>,
}

/// Connects to `address` (resolved now) within `timeout`.
async fn connect(address: &str, unit: u8, timeout: Duration) -> Result<Context, String> {
    let attempt = async {
        let addr = tokio::net::lookup_host(address)
            .await
            .map_err(|e| format!("cannot resolve {address}: {e}"))?
            .next()
            .ok_or_else(|| format!("{address} resolves to no address"))?;
        tokio_modbus::client::tcp::connect_slave(addr, Slave(unit))
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("cannot connect to {address} within {timeout:?}")),
    }
}

impl Device {
    /// Makes sure there is a connection; the error is the points' status.
    async fn ensure_connected(&mut self, handle: &SourceHandle) -> Result<(), String> {
        if self.context.is_some() {
            return Ok(());
        }
        if let (Some(at), Some(why)) = (self.retry_at, &self.down) {
            if Instant::now() < at {
                return Err(format!("communication-lost: {why}"));
            }
        }
        match connect(&self.address, self.unit, self.timeout).await {
            Ok(context) => {
                if self.down.take().is_some() {
                    tracing::info!(source = handle.stream(), device = %self.address, "modbus device reachable again");
                } else {
                    tracing::debug!(source = handle.stream(), device = %self.address, "modbus connection made");
                }
                self.context = Some(context);
                self.retry_at = None;
                self.backoff = RECONNECT_MIN;
                Counters::add(&handle.counters().source_connections, 1);
                handle.status(|s| {
                    s.state = "connected";
                    s.connections += 1;
                    s.last_error = None;
                });
                Ok(())
            }
            Err(why) => {
                Counters::add(&handle.counters().modbus_connection_errors, 1);
                if self.down.is_none() {
                    tracing::warn!(source = handle.stream(), device = %self.address, error = %why,
                        "modbus device unreachable; its points are bad (communication-lost) until it answers, retrying with a backoff");
                }
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
                handle.status(|s| {
                    s.state = "retrying";
                    s.last_error = Some(why.clone());
                    *s.counts.entry("connection_errors").or_default() += 1;
                });
                self.down = Some(why.clone());
                Err(format!("communication-lost: {why}"))
            }
        }
    }

    /// Drops the connection after an answer that leaves the stream in doubt.
    fn disconnect(&mut self, handle: &SourceHandle, why: &str) {
        self.context = None;
        handle.status(|s| {
            s.state = "reconnecting";
            s.last_error = Some(why.to_string());
        });
    }

    async fn read(&mut self, req: &Request, handle: &SourceHandle) -> Outcome {
        if let Err(status) = self.ensure_connected(handle).await {
            return Outcome::Failed(status);
        }
        let counters = handle.counters();
        Counters::add(&counters.modbus_requests, 1);
        let context = self.context.as_mut().expect("connected above");
        let (address, count) = (req.address, req.count);
        let call = async {
            match req.kind {
                Kind::Coil => context
                    .read_coils(address, count)
                    .await
                    .map(|r| r.map(Answer::Bits)),
                Kind::Discrete => context
                    .read_discrete_inputs(address, count)
                    .await
                    .map(|r| r.map(Answer::Bits)),
                Kind::Holding => context
                    .read_holding_registers(address, count)
                    .await
                    .map(|r| r.map(Answer::Words)),
                Kind::Input => context
                    .read_input_registers(address, count)
                    .await
                    .map(|r| r.map(Answer::Words)),
            }
        };
        let what = format!("{} {address}..+{count}", req.kind.name());
        let (status, counter, count_name) = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(Ok(answer))) if answer.len() == usize::from(count) => {
                return Outcome::Answer(answer)
            }
            Ok(Ok(Ok(answer))) => (
                format!(
                    "malformed answer: {} values for a read of {what}",
                    answer.len()
                ),
                &counters.modbus_malformed,
                "malformed",
            ),
            Ok(Ok(Err(code))) => {
                Counters::add(&counters.modbus_exceptions, 1);
                handle.status(|s| *s.counts.entry("exceptions").or_default() += 1);
                return Outcome::Exception(code);
            }
            Ok(Err(tokio_modbus::Error::Protocol(e))) => (
                format!("malformed answer to a read of {what}: {e}"),
                &counters.modbus_malformed,
                "malformed",
            ),
            Ok(Err(tokio_modbus::Error::Transport(e)))
                if e.kind() == std::io::ErrorKind::InvalidData =>
            {
                (
                    format!("malformed answer to a read of {what}: {e}"),
                    &counters.modbus_malformed,
                    "malformed",
                )
            }
            Ok(Err(tokio_modbus::Error::Transport(e))) => (
                format!("communication-lost: reading {what}: {e}"),
                &counters.modbus_connection_errors,
                "connection_errors",
            ),
            Err(_) => (
                format!(
                    "timeout: no answer to a read of {what} within {:?}",
                    self.timeout
                ),
                &counters.modbus_timeouts,
                "timeouts",
            ),
        };
        Counters::add(counter, 1);
        handle.status(|s| *s.counts.entry(count_name).or_default() += 1);
        self.disconnect(handle, &status);
        Outcome::Failed(status)
    }
}

async fn run(cfg: Config, mut handle: SourceHandle) -> anyhow::Result<()> {
    let name = handle.stream().to_string();
    let interval = parse_interval(&cfg.interval).expect("validated");
    let timeout = parse_interval(&cfg.timeout).expect("validated");
    let mut plan = map::plan(&cfg.registers);
    tracing::info!(source = %name, device = %cfg.address, unit = cfg.unit, entries = cfg.registers.len(),
        requests = plan.len(), ?interval, "modbus source polling");
    let mut device = Device {
        address: cfg.address.clone(),
        unit: cfg.unit,
        timeout,
        context: None,
        retry_at: None,
        backoff: RECONNECT_MIN,
        down: None,
    };
    // The last status of each request (None: good), to log changes only.
    let mut last: Vec<Option<String>> = vec![None; plan.len()];
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown = handle.shutdown.clone();
    handle.status(|s| s.state = "connecting");
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => {}
        }
        if handle.is_shutting_down() {
            break;
        }
        let mut points = Vec::new();
        let mut bad = 0u64;
        let mut i = 0;
        // A poll of a device that answers nothing takes a timeout per
        // request: shutdown does not wait for the rest of it.
        while i < plan.len() && !handle.is_shutting_down() {
            let outcome = device.read(&plan[i], &handle).await;
            let ts_ns = now_ns();
            let status = match outcome {
                Outcome::Answer(answer) => {
                    for &item in &plan[i].items {
                        for (tag, value) in cfg.registers[item].decode(plan[i].address, &answer) {
                            points.push(point(tag, ts_ns, value, QUALITY_GOOD, None));
                        }
                    }
                    None
                }
                Outcome::Exception(code)
                    if code == ExceptionCode::IllegalDataAddress && plan[i].items.len() > 1 =>
                {
                    tracing::warn!(source = %name, device = %cfg.address,
                        request = %format!("{} {}..+{}", plan[i].kind.name(), plan[i].address, plan[i].count),
                        entries = plan[i].items.len(),
                        "the device refused a joined read (illegal data address); reading its entries one by one from now on");
                    map::split(&mut plan, i, &cfg.registers);
                    last = vec![None; plan.len()];
                    continue;
                }
                Outcome::Exception(code) => Some(exception_status(code)),
                Outcome::Failed(status) => Some(status),
            };
            if let Some(status) = &status {
                for &item in &plan[i].items {
                    let r = &cfg.registers[item];
                    for v in 0..r.values() {
                        bad += 1;
                        points.push(point(
                            r.tag_of(v),
                            ts_ns,
                            // No value: a sink writes `null`.
                            Value::F64(f64::NAN),
                            QUALITY_BAD,
                            Some(status.clone()),
                        ));
                    }
                }
            }
            if status != last[i] {
                let req = &plan[i];
                let request = format!("{} {}..+{}", req.kind.name(), req.address, req.count);
                match &status {
                    // A device that is down is logged once, by the connection.
                    Some(s) if s.starts_with("communication-lost") => {}
                    Some(s) => {
                        tracing::warn!(source = %name, device = %cfg.address, %request, status = %s, "modbus read failed; its points are bad")
                    }
                    None => {
                        tracing::info!(source = %name, device = %cfg.address, %request, "modbus read answered again")
                    }
                }
                last[i] = status;
            }
            i += 1;
        }
        Counters::add(&handle.counters().modbus_bad_points, bad);
        handle.status(|s| {
            *s.counts.entry("polls").or_default() += 1;
            *s.counts.entry("bad_points").or_default() += bad;
        });
        let points: Vec<RecordBody> = points.into_iter().map(RecordBody::Point).collect();
        handle.emit_batch(&points);
    }
    Ok(())
}

fn point(tag: String, ts_ns: i64, value: Value, quality: u8, status: Option<String>) -> Point {
    Point {
        tag,
        ts_ns,
        value,
        quality,
        status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_take_milliseconds_seconds_minutes_and_hours() {
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_interval("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_interval("1.5s").unwrap_err().contains("not a unit"));
        assert!(parse_interval("fast")
            .unwrap_err()
            .contains("not a duration"));
        assert!(parse_interval("10").unwrap_err().contains("not a unit"));
    }

    fn config(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map(|_| c)
    }

    #[test]
    fn a_register_map_config_is_checked_naming_the_entry_and_key() {
        let ok = config(
            "address = \"127.0.0.1:5020\"\ninterval = \"500ms\"\n\
             [[registers]]\ntag = \"t\"\nkind = \"holding\"\naddress = 0\ntype = \"f32\"\nword_order = \"little\"\n",
        )
        .unwrap();
        assert_eq!((ok.unit, ok.timeout.as_str()), (1, "1s"));
        let err = config(
            "address = \"127.0.0.1\"\n[[registers]]\ntag = \"t\"\nkind = \"coil\"\naddress = 0\n",
        )
        .unwrap_err();
        assert!(
            err.starts_with("address: `127.0.0.1` must be host:port"),
            "{err}"
        );
        let err = config("address = \"h:502\"\ninterval = \"1ms\"\n[[registers]]\ntag = \"t\"\nkind = \"coil\"\naddress = 0\n").unwrap_err();
        assert!(err.starts_with("interval: 1ms must be between"), "{err}");
        let err = config("address = \"h:502\"\nregisters = []\n").unwrap_err();
        assert!(err.starts_with("registers: is empty"), "{err}");
        let err = config(
            "address = \"h:502\"\n[[registers]]\ntag = \"t\"\nkind = \"coil\"\naddress = 0\n\
             [[registers]]\ntag = \"x\"\nkind = \"input\"\naddress = 0\ntype = \"f32\"\nscale = 2.0\nword_order = \"middle\"\n",
        )
        .unwrap_err();
        assert!(
            err.contains("word_order") && err.contains("middle"),
            "{err}"
        );
        let err = config(
            "address = \"h:502\"\n[[registers]]\ntag = \"t\"\nkind = \"coil\"\naddress = 0\n\
             [[registers]]\ntag = \"x\"\nkind = \"input\"\naddress = 0\ntype = \"string\"\n",
        )
        .unwrap_err();
        assert!(
            err.starts_with("registers[1] (x).count: a string needs"),
            "{err}"
        );
        let err = config(
            "address = \"h:502\"\n[[registers]]\ntag = \"t\"\nkind = \"coil\"\naddress = 0\ncount = 2\n\
             [[registers]]\ntag = \"t[1]\"\nkind = \"input\"\naddress = 0\n",
        )
        .unwrap_err();
        assert!(
            err.starts_with("registers[1].tag: `t[1]` is used twice"),
            "{err}"
        );
        let err = config(
            "address = \"h:502\"\n[[registers]]\ntag = \"t\"\nkind = \"relay\"\naddress = 0\n",
        )
        .unwrap_err();
        assert!(err.contains("relay") && err.contains("holding"), "{err}");
    }

    #[test]
    fn the_effective_config_shows_the_register_map_as_written() {
        let table: toml::Table = toml::from_str(
            "type = \"modbus\"\nname = \"plc\"\naddress = \"127.0.0.1:5020\"\n\
             [[registers]]\ntag = \"t\"\nkind = \"holding\"\naddress = 3\ntype = \"f32\"\nword_order = \"little\"\n\
             [[registers]]\ntag = \"c\"\nkind = \"coil\"\naddress = 0\n",
        )
        .unwrap();
        let source = crate::sources::SourceConfig::from_table(0, table).unwrap();
        source.validate().unwrap();
        #[derive(Serialize)]
        struct Wrap {
            sources: Vec<crate::sources::SourceConfig>,
        }
        let text = toml::to_string(&Wrap {
            sources: vec![source],
        })
        .unwrap();
        assert!(
            text.contains("interval = \"1s\"")
                && text.contains("word_order = \"little\"")
                && !text.contains("scale"),
            "{text}"
        );
    }

    #[test]
    fn exceptions_are_named_with_their_code() {
        assert_eq!(
            exception_status(ExceptionCode::IllegalDataAddress),
            "modbus exception 0x02 (illegal data address)"
        );
        assert_eq!(
            exception_status(ExceptionCode::Custom(0x42)),
            "modbus exception 0x42 (unknown exception)"
        );
    }
}
