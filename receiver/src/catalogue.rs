//! The stream catalogue: what the receiver knows about each stream it
//! delivers — the source type the sender announced with it, how many
//! distinct tags (point tags, message topics) it has shown, its rate over
//! the last seconds, when it was first and last seen, and how long its
//! records took from their source timestamp to a sink's confirmation.
//!
//! The journal thread owns a [`Catalogue`] (one call per record, no lock)
//! and copies its [`StreamEntry`] rows to the status board at each tick;
//! each sink thread keeps a [`LatencyBook`] it fills once per confirmed
//! write. Everything here is bounded: the number of streams, the tag
//! hashes per stream and in all, the rate window and the histogram buckets.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;

use weir_protocol::decoder::Delivered;
use weir_protocol::RecordBody;

/// Streams catalogued at most. `decoder.max_streams` (default 4096) already
/// bounds what the decoder delivers; this is the backstop for the map here,
/// and a stream past it is counted in `not_catalogued`, not shown.
pub const MAX_STREAMS: usize = 65_536;
/// Distinct tags counted per stream; past it the count shows as "at least".
/// A tag is kept as a 64-bit hash (8 bytes plus the set's overhead), so one
/// stream holds at most about 1 MiB.
pub const MAX_TAGS_PER_STREAM: usize = 65_536;
/// Tag hashes kept over all streams (about 4 MiB): many streams with many
/// tags saturate here rather than grow.
pub const MAX_TAGS_TOTAL: usize = 262_144;
/// The rate is measured over this many ticks of the journal thread (250 ms
/// each): 40 ticks are the last 10 seconds.
pub const RATE_SAMPLES: usize = 40;

/// Upper bounds (seconds) of the latency histogram's buckets: 1, 2.5 and 5
/// per decade from 100 µs to 10 000 s (under three hours), then +Inf. Fixed,
/// so a stream's histogram is 27 counters whatever it sees; a quantile is
/// read to within its bucket (interpolated linearly inside it).
pub const LATENCY_BOUNDS: [f64; 25] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// Source-to-sink latencies of one stream, in fixed buckets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Latency {
    /// Per bucket (not cumulative): `buckets[i]` counts latencies in
    /// `(LATENCY_BOUNDS[i-1], LATENCY_BOUNDS[i]]`; the last is above every bound.
    pub buckets: [u64; LATENCY_BOUNDS.len() + 1],
    pub sum: f64,
    pub count: u64,
    /// Records whose source timestamp was after the moment a sink confirmed
    /// them (the source's clock is ahead of the receiver's): counted as 0 s.
    pub ahead: u64,
}

impl Latency {
    pub fn observe(&mut self, seconds: f64) {
        let s = if seconds.is_finite() && seconds > 0.0 {
            seconds
        } else {
            // Negative: the source clock is ahead. NaN cannot come from
            // two integers, but is counted the same way rather than lost.
            self.ahead += 1;
            0.0
        };
        let i = LATENCY_BOUNDS.partition_point(|b| *b < s);
        self.buckets[i] += 1;
        self.sum += s;
        self.count += 1;
    }

    pub fn merge(&mut self, other: &Latency) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.sum += other.sum;
        self.count += other.count;
        self.ahead += other.ahead;
    }

    /// The `q` quantile (0..=1) in seconds, interpolated inside its bucket;
    /// None with no observation. In the overflow bucket it is the last
    /// bound (a lower bound of the truth).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        quantile(&self.buckets, q)
    }
}

/// The `q` quantile of per-bucket counts over [`LATENCY_BOUNDS`] (plus
/// overflow), as `Latency::quantile`; `status` uses it on scraped buckets.
pub fn quantile(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    // The rank of the wanted observation, 1-based.
    let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0);
    let mut below = 0u64;
    for (i, n) in buckets.iter().enumerate() {
        if *n == 0 {
            continue;
        }
        if (below + n) as f64 >= rank {
            let Some(upper) = LATENCY_BOUNDS.get(i) else {
                return Some(LATENCY_BOUNDS[LATENCY_BOUNDS.len() - 1]);
            };
            let lower = if i == 0 { 0.0 } else { LATENCY_BOUNDS[i - 1] };
            let within = (rank - below as f64) / *n as f64;
            return Some(lower + (upper - lower) * within);
        }
        below += n;
    }
    Some(LATENCY_BOUNDS[LATENCY_BOUNDS.len() - 1])
}

/// One sink's latencies per stream: filled by the sink thread once per
/// confirmed write, read by the status board at each scrape. At most
/// [`MAX_STREAMS`] streams; records of streams past it are counted in
/// `not_catalogued`.
#[derive(Debug, Default)]
pub struct LatencyBook {
    pub streams: HashMap<Arc<str>, Latency>,
    pub not_catalogued: u64,
}

impl LatencyBook {
    /// Records that a sink confirmed `records` at `now_ns` (Unix time,
    /// nanoseconds). Records without a source timestamp (byte chunks) and
    /// file parts (whose time is the file's mtime, not when it was read)
    /// are not measured.
    pub fn confirmed<'a>(&mut self, records: impl IntoIterator<Item = &'a Delivered>, now_ns: i64) {
        // Streams come in runs: measure a run locally, then add it to the
        // map once (one hash per run, not per record).
        let mut run: Option<(&Arc<str>, Latency)> = None;
        for r in records {
            let ts = match &r.body {
                RecordBody::File(_) | RecordBody::Bytes(_) => continue,
                body => match body.timestamp_ns() {
                    Some(ts) => ts,
                    None => continue,
                },
            };
            let seconds = now_ns.saturating_sub(ts) as f64 / 1e9;
            match &mut run {
                Some((stream, lat)) if Arc::ptr_eq(stream, &r.stream) => lat.observe(seconds),
                _ => {
                    if let Some((stream, lat)) = run.take() {
                        self.add(stream, &lat);
                    }
                    let mut lat = Latency::default();
                    lat.observe(seconds);
                    run = Some((&r.stream, lat));
                }
            }
        }
        if let Some((stream, lat)) = run {
            self.add(stream, &lat);
        }
    }

    fn add(&mut self, stream: &Arc<str>, lat: &Latency) {
        let full = self.streams.len() >= MAX_STREAMS;
        match self.streams.get_mut(stream) {
            Some(l) => l.merge(lat),
            None if full => self.not_catalogued += lat.count,
            None => {
                self.streams.insert(stream.clone(), lat.clone());
            }
        }
    }
}

/// Distinct tags of one stream, kept as hashes.
#[derive(Debug, Default)]
struct Tags {
    hashes: HashSet<u64, BuildHasherDefault<IdentityHasher>>,
    /// True once a tag was not kept for a bound: the count is a lower bound.
    saturated: bool,
}

/// The hashes are already uniform: hashing them again is wasted work.
#[derive(Default)]
struct IdentityHasher(u64);

impl std::hash::Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// What the catalogue keeps per stream.
#[derive(Debug)]
struct Stream {
    source_type: Arc<str>,
    records: u64,
    tags: Tags,
    first_seen_ns: Option<i64>,
    last_seen_ns: Option<i64>,
    /// Records at each of the last ticks: (tick time in ms, records).
    window: VecDeque<(u64, u64)>,
    /// Records counted since the last tick.
    since_tick: u64,
}

/// One stream's row, as the board shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEntry {
    pub name: String,
    pub source_type: String,
    pub records: u64,
    pub tags: u64,
    /// True when `tags` is a lower bound (a tag bound was reached).
    pub tags_saturated: bool,
    /// Records per second over the last [`RATE_SAMPLES`] ticks.
    pub rate: f64,
    /// Unix time in nanoseconds, to the journal thread's tick (250 ms).
    pub first_seen_ns: Option<i64>,
    pub last_seen_ns: Option<i64>,
}

/// The journal thread's catalogue (see the module doc).
#[derive(Debug, Default)]
pub struct Catalogue {
    /// In the order first seen; `index` finds a stream's place.
    streams: Vec<(Arc<str>, Stream)>,
    index: HashMap<Arc<str>, usize>,
    /// Tag hashes held over all streams.
    tags_total: usize,
    /// Records of streams past [`MAX_STREAMS`].
    pub not_catalogued: u64,
    /// The stream of the last record and its place: records come in runs
    /// of one stream, and a pointer compare saves hashing its name.
    last: Option<(Arc<str>, usize)>,
}

impl Catalogue {
    /// Notes a record the decoder delivered.
    pub fn observe(&mut self, r: &Delivered) {
        let i = match &self.last {
            Some((stream, i)) if Arc::ptr_eq(stream, &r.stream) => *i,
            _ => {
                let i = match self.index.get(&r.stream) {
                    Some(i) => *i,
                    None if self.streams.len() >= MAX_STREAMS => {
                        self.not_catalogued += 1;
                        return;
                    }
                    None => {
                        self.streams.push((
                            r.stream.clone(),
                            Stream {
                                source_type: r.source_type.clone(),
                                records: 0,
                                tags: Tags::default(),
                                first_seen_ns: None,
                                last_seen_ns: None,
                                window: VecDeque::with_capacity(RATE_SAMPLES + 1),
                                since_tick: 0,
                            },
                        ));
                        self.index.insert(r.stream.clone(), self.streams.len() - 1);
                        self.streams.len() - 1
                    }
                };
                self.last = Some((r.stream.clone(), i));
                i
            }
        };
        let s = &mut self.streams[i].1;
        s.records += 1;
        s.since_tick += 1;
        if !Arc::ptr_eq(&s.source_type, &r.source_type) && *s.source_type != *r.source_type {
            // A new sender configuration may change a stream's source.
            s.source_type = r.source_type.clone();
        }
        let tag = match &r.body {
            RecordBody::Point(p) => Some(p.tag.as_str()),
            RecordBody::Message(m) => Some(m.topic.as_str()),
            _ => None,
        };
        if let Some(tag) = tag {
            let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(tag);
            if !s.tags.hashes.contains(&h) {
                if s.tags.hashes.len() >= MAX_TAGS_PER_STREAM || self.tags_total >= MAX_TAGS_TOTAL {
                    s.tags.saturated = true;
                } else {
                    s.tags.hashes.insert(h);
                    self.tags_total += 1;
                }
            }
        }
    }

    /// The periodic step: `now_ms` is a monotonic time in milliseconds,
    /// `wall_ns` the Unix time in nanoseconds. Streams with records since the
    /// last tick are seen now; each stream's rate window moves on.
    pub fn tick(&mut self, now_ms: u64, wall_ns: i64) {
        for (_, s) in self.streams.iter_mut() {
            if s.since_tick > 0 {
                s.first_seen_ns.get_or_insert(wall_ns);
                s.last_seen_ns = Some(wall_ns);
                s.since_tick = 0;
            }
            s.window.push_back((now_ms, s.records));
            while s.window.len() > RATE_SAMPLES + 1 {
                s.window.pop_front();
            }
        }
    }

    /// Every catalogued stream, by name.
    pub fn entries(&self) -> Vec<StreamEntry> {
        let mut rows: Vec<StreamEntry> = self
            .streams
            .iter()
            .map(|(name, s)| StreamEntry {
                name: name.to_string(),
                source_type: s.source_type.to_string(),
                records: s.records,
                tags: s.tags.hashes.len() as u64,
                tags_saturated: s.tags.saturated,
                rate: rate(&s.window),
                first_seen_ns: s.first_seen_ns,
                last_seen_ns: s.last_seen_ns,
            })
            .collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }
}

/// Records per second between the oldest and the newest sample of a window.
fn rate(window: &VecDeque<(u64, u64)>) -> f64 {
    match (window.front(), window.back()) {
        (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => {
            n1.saturating_sub(*n0) as f64 * 1000.0 / (t1 - t0) as f64
        }
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_protocol::{Point, Value};

    fn point(stream: &Arc<str>, tag: &str, ts_ns: i64) -> Delivered {
        Delivered {
            stream: stream.clone(),
            source_type: Arc::from("generator"),
            session: 1,
            epoch: 1,
            seq: 0,
            resent: false,
            body: RecordBody::Point(Point {
                tag: tag.to_string(),
                ts_ns,
                value: Value::F64(1.0),
                quality: 0,
                status: None,
            }),
        }
    }

    #[test]
    fn latency_quantiles_fall_in_the_bucket_of_the_observations() {
        let mut l = Latency::default();
        assert_eq!(l.quantile(0.5), None, "nothing observed, no quantile");
        // 98 fast (3 ms), 2 slow (7 s).
        for _ in 0..98 {
            l.observe(0.003);
        }
        for _ in 0..2 {
            l.observe(7.0);
        }
        let p50 = l.quantile(0.5).unwrap();
        assert!((0.0025..=0.005).contains(&p50), "p50 {p50}");
        let p99 = l.quantile(0.99).unwrap();
        assert!((5.0..=10.0).contains(&p99), "p99 {p99}");
        assert_eq!(l.count, 100);
        assert!((l.sum - (98.0 * 0.003 + 14.0)).abs() < 1e-9);
    }

    #[test]
    fn a_latency_past_the_last_bound_reads_as_that_bound_and_a_clock_ahead_as_zero() {
        let mut l = Latency::default();
        l.observe(1e6);
        assert_eq!(l.buckets[LATENCY_BOUNDS.len()], 1);
        assert_eq!(l.quantile(0.99), Some(10000.0));
        let mut ahead = Latency::default();
        ahead.observe(-2.0);
        assert_eq!((ahead.ahead, ahead.buckets[0]), (1, 1));
        assert_eq!(ahead.quantile(0.5), Some(0.0001));
    }

    #[test]
    fn a_sinks_latency_book_measures_each_confirmed_record_from_its_source_timestamp() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let now = 1_000_000_000_000i64;
        let records = vec![
            point(&a, "t", now - 2_000_000), // 2 ms
            point(&a, "t", now - 2_000_000),
            point(&b, "t", now - 3_000_000_000), // 3 s
        ];
        let mut book = LatencyBook::default();
        book.confirmed(&records, now);
        assert_eq!(book.streams[&a].count, 2);
        assert_eq!(book.streams[&b].count, 1);
        let p = book.streams[&b].quantile(0.5).unwrap();
        assert!((2.5..=5.0).contains(&p), "{p}");
        let mut merged = book.streams[&a].clone();
        merged.merge(&book.streams[&b]);
        assert_eq!(merged.count, 3);
    }

    #[test]
    fn the_rate_is_records_over_the_last_ticks_only() {
        let s: Arc<str> = Arc::from("s");
        let mut c = Catalogue::default();
        // 100 records per 250 ms tick for 20 s, then 10 per tick.
        let mut t = 0;
        for _ in 0..80 {
            for _ in 0..100 {
                c.observe(&point(&s, "t", 0));
            }
            t += 250;
            c.tick(t, t as i64 * 1_000_000);
        }
        assert_eq!(c.entries()[0].rate, 400.0);
        for _ in 0..RATE_SAMPLES {
            for _ in 0..10 {
                c.observe(&point(&s, "t", 0));
            }
            t += 250;
            c.tick(t, t as i64 * 1_000_000);
        }
        let e = &c.entries()[0];
        assert_eq!(e.rate, 40.0, "the old rate has left the window");
        assert_eq!(e.records, 8000 + 10 * RATE_SAMPLES as u64);
        assert_eq!(e.first_seen_ns, Some(250_000_000));
        assert_eq!(e.last_seen_ns, Some(t as i64 * 1_000_000));
        // No records: last seen stays, the rate falls to zero.
        for _ in 0..RATE_SAMPLES {
            t += 250;
            c.tick(t, t as i64 * 1_000_000);
        }
        let idle = &c.entries()[0];
        assert_eq!(idle.rate, 0.0);
        assert_eq!(idle.last_seen_ns, e.last_seen_ns);
    }

    #[test]
    fn tags_are_counted_once_each_and_the_count_stops_at_its_bound() {
        let s: Arc<str> = Arc::from("s");
        let mut c = Catalogue::default();
        for round in 0..3 {
            for i in 0..50 {
                c.observe(&point(&s, &format!("plant/tag-{i}"), round));
            }
        }
        let e = &c.entries()[0];
        assert_eq!((e.tags, e.tags_saturated), (50, false));
        assert_eq!(e.source_type, "generator");
        for i in 0..MAX_TAGS_PER_STREAM + 10 {
            c.observe(&point(&s, &format!("many-{i}"), 0));
        }
        let e = &c.entries()[0];
        assert_eq!(e.tags, MAX_TAGS_PER_STREAM as u64);
        assert!(e.tags_saturated, "the count is marked as a lower bound");
        assert_eq!(c.tags_total, MAX_TAGS_PER_STREAM);
    }

    #[test]
    fn the_total_tag_bound_holds_over_many_streams() {
        let mut c = Catalogue::default();
        let per = MAX_TAGS_PER_STREAM;
        let streams = MAX_TAGS_TOTAL / per + 2;
        for k in 0..streams {
            let s: Arc<str> = Arc::from(format!("s{k}").as_str());
            for i in 0..per {
                c.observe(&point(&s, &format!("t{i}"), 0));
            }
        }
        assert_eq!(c.tags_total, MAX_TAGS_TOTAL);
        let saturated = c.entries().iter().filter(|e| e.tags_saturated).count();
        assert_eq!(saturated, 2, "the streams past the total bound say so");
    }

    #[test]
    fn streams_past_the_bound_are_counted_not_catalogued() {
        let mut c = Catalogue::default();
        for k in 0..MAX_STREAMS + 3 {
            let s: Arc<str> = Arc::from(format!("s{k}").as_str());
            c.observe(&point(&s, "t", 0));
        }
        assert_eq!(c.entries().len(), MAX_STREAMS);
        assert_eq!(c.not_catalogued, 3);
    }
}
