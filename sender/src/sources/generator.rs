//! `generator`: synthetic sensor points at a set rate, for demos and
//! benchmarks. Each tick emits the points due since the last one, cycling
//! through `tags` tags with a sine wave per tag.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use weir_protocol::{Point, RecordBody, Value};

use super::{Source, SourceHandle};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Distinct tags, named `{name}/tag-00000` onwards.
    #[serde(default = "default_tags")]
    pub tags: u32,
    /// Points per second, all tags together.
    #[serde(default = "default_rate")]
    pub rate: f64,
    /// Stop after this many points (the source then finishes); default: run forever.
    #[serde(default)]
    pub count: Option<u64>,
}

fn default_tags() -> u32 {
    100
}
fn default_rate() -> f64 {
    1000.0
}

impl Source for Config {
    const TYPE: &'static str = "generator";

    fn validate(&self) -> Result<(), String> {
        if self.tags == 0 || self.tags > 1_000_000 {
            return Err(format!("tags: {} must be between 1 and 1000000", self.tags));
        }
        if !(self.rate > 0.0 && self.rate <= 10_000_000.0) {
            return Err(format!(
                "rate: {} points per second must be above 0 and at most 10000000",
                self.rate
            ));
        }
        Ok(())
    }

    async fn run(self, handle: SourceHandle) -> anyhow::Result<()> {
        run(self, handle).await
    }
}

const TICK: Duration = Duration::from_millis(5);
/// Points appended to the spool under one lock: few enough that the link
/// thread, which reads under the same lock, never waits long.
const EMIT_BATCH: usize = 256;

async fn run(cfg: Config, mut handle: SourceHandle) -> anyhow::Result<()> {
    let name = handle.stream().to_string();
    let tags: Vec<String> = (0..cfg.tags)
        .map(|i| format!("{}/tag-{i:05}", name))
        .collect();
    let start = Instant::now();
    let mut emitted: u64 = 0;
    let mut batch = Vec::with_capacity(EMIT_BATCH);
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if handle.is_shutting_down() {
            return Ok(());
        }
        let due = (start.elapsed().as_secs_f64() * cfg.rate) as u64;
        let due = cfg.count.map_or(due, |c| due.min(c));
        let ts_ns = super::now_ns();
        while emitted < due {
            let tag = emitted % cfg.tags as u64;
            let phase = tag as f64 * 0.1 + ts_ns as f64 * 1e-9;
            batch.push(RecordBody::Point(Point {
                tag: tags[tag as usize].clone(),
                ts_ns,
                value: Value::F64((phase.sin() * 100.0 * 1000.0).round() / 1000.0),
                quality: 0,
                status: None,
            }));
            emitted += 1;
            if batch.len() == EMIT_BATCH || emitted == due {
                handle.emit_batch(&batch);
                batch.clear();
            }
        }
        if cfg.count.is_some_and(|c| emitted >= c) {
            tracing::info!(source = %name, points = emitted, "generator finished its count");
            return Ok(());
        }
    }
}
