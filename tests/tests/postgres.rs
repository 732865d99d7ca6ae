//! The `postgres` sink end to end against the real PostgreSQL on
//! 127.0.0.1:5432 (database `test`, trust auth): generator points and
//! syslog logs through weir-sender, the link (through weir-linksim where
//! loss matters), weir-receiver and its `postgres` sink, read back from
//! the tables. Each test uses its own tables (a unique prefix) and drops
//! them when it ends. The outage test puts a TCP proxy of its own between
//! the sink and the server and stops it for 20 s (its port refuses
//! connections, open ones are closed), so the shared server is never
//! stopped.
//!
//! Without a server on :5432 these tests print why and pass as skipped;
//! with `WEIR_SERVICES=1` (`make test-services`, CI) a missing server fails.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const SERVER: &str = "127.0.0.1:5432";
const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// True when PostgreSQL answers; otherwise prints why the test is skipped
/// (or fails when WEIR_SERVICES=1 says the services must be there).
fn server_answers(test: &str) -> bool {
    let up =
        postgres::Client::connect(&format!("{URL}?connect_timeout=2"), postgres::NoTls).is_ok();
    if !up {
        if std::env::var("WEIR_SERVICES").is_ok_and(|v| v == "1") {
            panic!("{test}: WEIR_SERVICES=1 but PostgreSQL does not answer at {URL} (.ci/run starts it)");
        }
        eprintln!("SKIPPED {test}: PostgreSQL does not answer at {URL} (start it, or run `make test-services`)");
    }
    up
}

fn db() -> postgres::Client {
    postgres::Client::connect(URL, postgres::NoTls).expect("connecting to the test database")
}

/// A table prefix no other test run shares; the tables (and the cursor
/// rows) are dropped when it goes.
struct Tables {
    prefix: String,
}

impl Tables {
    fn new(test: &str) -> Tables {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Tables {
            prefix: format!("weirt_{test}_{}_{}", std::process::id(), nanos % 1_000_000),
        }
    }

    fn name(&self, what: &str) -> String {
        format!("{}_{what}", self.prefix)
    }

    /// The `[[sinks]]` table of a postgres sink named `pg` on these tables.
    fn sink(&self, url: &str, extra: &str) -> String {
        format!(
            "[[sinks]]\nname = \"pg\"\ntype = \"postgres\"\nurl = \"{url}\"\npoints_table = \"{}\"\n\
             messages_table = \"{}\"\nlogs_table = \"{}\"\nbytes_table = \"{}\"\ncursor_table = \"{}\"\n{extra}",
            self.name("points"),
            self.name("messages"),
            self.name("logs"),
            self.name("bytes"),
            self.name("cursor"),
        )
    }
}

impl Drop for Tables {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(URL, postgres::NoTls) {
            for t in ["points", "messages", "logs", "bytes", "cursor"] {
                let _ = c.batch_execute(&format!("DROP TABLE IF EXISTS {}", self.name(t)));
            }
        }
    }
}

/// Per stream, the `seq` of each row in `table`, in commit order (by the
/// committing transaction, then the order COPY wrote them in).
fn rows(table: &str) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let q = format!("SELECT stream, seq FROM {table} ORDER BY xmin::text::bigint, ctid");
    for r in db().query(&q, &[]).unwrap_or_default() {
        let (stream, seq): (String, i64) = (r.get(0), r.get(1));
        out.entry(stream).or_default().push(seq as u64);
    }
    out
}

fn count(table: &str) -> u64 {
    db().query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .map(|r| r.get::<_, i64>(0) as u64)
        .unwrap_or(0)
}

struct Link {
    sender_port: u16,
    receiver_port: u16,
}

impl Link {
    fn new() -> Link {
        Link {
            sender_port: free_udp_port(),
            receiver_port: free_udp_port(),
        }
    }

    fn linksim(&self, s: &Scratch, loss: f64) -> Proc {
        Linksim::new(s, self.sender_port, self.receiver_port, 11, loss)
            .no_bursts()
            .stats_file()
            .spawn()
    }
}

fn sender(s: &Scratch, port: u16, sources: &str) -> Proc {
    let cfg = format!(
        "{}[link]\ndestination = \"127.0.0.1:{port}\"\nrate = \"200Mbit\"\n[metrics]\npath = \"{d}/sender-metrics.json\"\nlog_interval_s = 1\n[spool]\npath = \"{d}/spool\"\n{sources}",
        sender_auth(s),
        d = s.path.display()
    );
    let path = s.write("sender.toml", &cfg);
    Proc::spawn(
        s,
        "sender",
        "weir-sender",
        &["run", "--config", path.to_str().unwrap()],
    )
}

fn receiver(s: &Scratch, log: &str, port: u16, sinks: &str) -> Proc {
    let d = s.path.display();
    let cfg = format!(
        "{}[link]\nlisten = \"127.0.0.1:{port}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n[journal]\npath = \"{d}/state\"\n\
         [metrics]\npath = \"{d}/receiver-metrics.json\"\nlog_interval_s = 1\n{sinks}",
        receiver_auth(s),
    );
    let path = s.write("receiver.toml", &cfg);
    Proc::spawn(
        s,
        log,
        "weir-receiver",
        &["run", "--config", path.to_str().unwrap()],
    )
}

fn generator(name: &str, rate: u64, count: u64) -> String {
    format!("[[sources]]\nname = \"{name}\"\ntype = \"generator\"\ntags = 100\nrate = {rate}\ncount = {count}\n")
}

fn metric(s: &Scratch, key: &str) -> Option<u64> {
    read_json(&s.join("receiver-metrics.json"))[key].as_u64()
}

/// Waits until `table` holds `want` rows, or until nothing new arrived for
/// `quiet` while the sink is not behind, at most `limit`.
fn wait_for_rows(s: &Scratch, table: &str, want: u64, quiet: Duration, limit: Duration) -> u64 {
    let start = Instant::now();
    let (mut last, mut since) = (u64::MAX, Instant::now());
    loop {
        let n = count(table);
        if n >= want || start.elapsed() > limit {
            return n;
        }
        if n != last {
            (last, since) = (n, Instant::now());
        } else if since.elapsed() >= quiet && metric(s, "sink.pg.behind") == Some(0) {
            return n;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Sends `count` RFC 5424 lines over TCP to a syslog source on `port`
/// (retrying the connection until the source listens).
fn send_logs(port: u16, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut conn = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "syslog source never listened: {e}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let mut text = String::new();
    for i in 0..count {
        text.push_str(&format!(
            "<134>1 2026-11-30T06:00:00.{:06}Z plc-{} historian 42 EXP [meta seq=\"{i}\"] export line {i}\n",
            i % 1_000_000,
            i % 7
        ));
    }
    conn.write_all(text.as_bytes()).unwrap();
    conn.shutdown(Shutdown::Write).unwrap();
}

#[test]
fn points_and_logs_land_in_their_tables_exactly_once_in_order_through_2pct_loss() {
    let test = "postgres_e2e";
    if !server_answers(test) {
        return;
    }
    let s = Scratch::new("pg-e2e");
    let t = Tables::new("e2e");
    let link = Link::new();
    let mut receiver = receiver(&s, "receiver", link.receiver_port, &t.sink(URL, ""));
    let _linksim = link.linksim(&s, 0.02);
    let (points, logs) = (100_000u64, 2_000u64);
    let syslog_port = free_tcp_port();
    let mut sender = sender(
        &s,
        link.sender_port,
        &format!(
            "{}[[sources]]\nname = \"plant/syslog\"\ntype = \"syslog\"\nlisten = \"tcp://127.0.0.1:{syslog_port}\"\n",
            generator("plant/gen", 25_000, points)
        ),
    );
    send_logs(syslog_port, logs);
    let got = wait_for_rows(
        &s,
        &t.name("points"),
        points,
        Duration::from_secs(5),
        Duration::from_secs(60),
    );
    wait_for_rows(
        &s,
        &t.name("logs"),
        logs,
        Duration::from_secs(3),
        Duration::from_secs(20),
    );
    assert!(
        receiver.is_running(),
        "the receiver died: {}",
        log_text(&s, "receiver")
    );
    assert!(
        sender.stop(Duration::from_secs(10)),
        "the sender did not stop cleanly"
    );
    assert!(
        receiver.stop(Duration::from_secs(20)),
        "the receiver did not stop cleanly"
    );
    let audit = s.join("audit.jsonl");
    let p = rows(&t.name("points"));
    let l = rows(&t.name("logs"));
    eprintln!(
        "points rows {got}, logs rows {}",
        l.values().map(Vec::len).sum::<usize>()
    );
    let gen_gaps = gaps(&audit, "plant/gen");
    let log_gaps = gaps(&audit, "plant/syslog");
    assert_exactly_accounted(p.get("plant/gen").map_or(&[][..], |v| v), &gen_gaps, points);
    assert_exactly_accounted(
        l.get("plant/syslog").map_or(&[][..], |v| v),
        &log_gaps,
        logs,
    );
    assert!(
        gen_gaps.is_empty() && log_gaps.is_empty(),
        "2% loss is within FEC: {gen_gaps:?} {log_gaps:?}"
    );
    // The values and the log fields are in their columns.
    let mut c = db();
    let row = c
        .query_one(
            &format!(
                "SELECT tag, value, quality, ts > now() - interval '1 hour' FROM {} WHERE seq = 0",
                t.name("points")
            ),
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "plant/gen/tag-00000");
    assert!(row.get::<_, Option<f64>>(1).is_some());
    assert_eq!(row.get::<_, i16>(2), 0);
    assert!(row.get::<_, bool>(3), "ts is the source time");
    let row = c
        .query_one(
            &format!("SELECT host, app, proc_id, msg_id, text, structured_data::text, severity, facility FROM {} WHERE seq = 7", t.name("logs")),
            &[],
        )
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, String>(2),
            row.get::<_, String>(3)
        ),
        (
            "plc-0".to_string(),
            "historian".to_string(),
            "42".to_string(),
            "EXP".to_string()
        )
    );
    assert_eq!(row.get::<_, String>(4), "export line 7");
    assert_eq!(row.get::<_, String>(5), r#"{"meta": [["seq", "7"]]}"#);
    assert_eq!((row.get::<_, i16>(6), row.get::<_, i16>(7)), (6, 16));
    // The cursor table holds each stream's last position for sink `pg`.
    let last: i64 = c
        .query_one(
            &format!(
                "SELECT max(seq) FROM {} WHERE sink = 'pg' AND stream = 'plant/gen'",
                t.name("cursor")
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(last as u64, points - 1);
}

/// Drops the tables it names when it goes.
struct DropTables(Vec<String>);

impl Drop for DropTables {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(URL, postgres::NoTls) {
            for t in &self.0 {
                let _ = c.batch_execute(&format!("DROP TABLE IF EXISTS \"{t}\""));
            }
        }
    }
}

#[test]
fn a_stream_template_puts_each_streams_points_in_its_own_table_exactly_once_in_order() {
    let test = "postgres_table_template";
    if !server_answers(test) {
        return;
    }
    let s = Scratch::new("pg-template");
    let t = Tables::new("tpl");
    // `plant/a` -> <prefix>_plant_a, `plant/B-2` -> <prefix>_plant_b_2
    // (lowercased, each other character `_`). The fixed tables share the
    // template's prefix: a stream named `messages` would get a hashed name.
    let template = format!("{}_{{stream}}", t.prefix);
    let (table_a, table_b) = (t.name("plant_a"), t.name("plant_b_2"));
    let _drop = DropTables(vec![table_a.clone(), table_b.clone()]);
    let sink = t.sink(URL, "").replace(
        &format!("points_table = \"{}\"", t.name("points")),
        &format!("points_table = \"{template}\""),
    );
    assert!(sink.contains(&template), "{sink}");
    let link = Link::new();
    let mut receiver = receiver(&s, "receiver", link.receiver_port, &sink);
    let _linksim = link.linksim(&s, 0.02);
    let each = 20_000u64;
    let mut sender = sender(
        &s,
        link.sender_port,
        &format!(
            "{}{}",
            generator("plant/a", 10_000, each),
            generator("plant/B-2", 10_000, each)
        ),
    );
    for table in [&table_a, &table_b] {
        wait_for_rows(
            &s,
            table,
            each,
            Duration::from_secs(5),
            Duration::from_secs(60),
        );
    }
    assert!(
        receiver.is_running(),
        "the receiver died: {}",
        log_text(&s, "receiver")
    );
    assert!(
        sender.stop(Duration::from_secs(10)),
        "the sender did not stop cleanly"
    );
    assert!(
        receiver.stop(Duration::from_secs(20)),
        "the receiver did not stop cleanly"
    );
    let audit = s.join("audit.jsonl");
    for (stream, table) in [("plant/a", &table_a), ("plant/B-2", &table_b)] {
        let got = rows(table);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            [stream],
            "{table} holds the rows of {stream} only"
        );
        let stream_gaps = gaps(&audit, stream);
        assert!(
            stream_gaps.is_empty(),
            "2% loss is within FEC: {stream_gaps:?}"
        );
        assert_exactly_accounted(&got[stream], &stream_gaps, each);
    }
    // Neither the fixed points table nor a hashed name was made, and the
    // created tables carry the comment that says whose they are.
    let mut c = db();
    let made: Vec<String> = c
        .query(
            "SELECT relname::text FROM pg_class WHERE relkind = 'r' AND relname LIKE $1 ORDER BY 1",
            &[&format!("{}%", t.prefix)],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(made, [t.name("cursor"), table_a.clone(), table_b.clone()]);
    let comment: String = c
        .query_one(
            "SELECT obj_description(to_regclass($1)::oid, 'pg_class')",
            &[&format!("\"{table_b}\"")],
        )
        .unwrap()
        .get(0);
    assert_eq!(comment, format!("weir points for {}_plant/B-2", t.prefix));
}

/// The hashed table name of docs/sinks.md for an ASCII raw name: its
/// clean name (lowercase, `/` `_`) cut to 54 bytes, `_`, FNV-1a 32 of
/// its bytes in hex.
fn hashed_name(raw: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in raw.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let clean = raw.to_ascii_lowercase().replace('/', "_");
    format!("{}_{h:08x}", &clean[..clean.len().min(54)])
}

#[test]
fn a_templated_name_another_stream_or_a_fixed_key_owns_goes_to_the_hashed_name() {
    let test = "postgres_table_template_clash";
    if !server_answers(test) {
        return;
    }
    let s = Scratch::new("pg-template-clash");
    let t = Tables::new("tcl");
    let p = &t.prefix;
    // `<p>_plant_a` belongs to stream `plant_a` (its comment says so);
    // `<p>_plant_x` was made by hand (no comment); `<p>_cursor` is the
    // cursor_table.
    let (owned, by_hand) = (t.name("plant_a"), t.name("plant_x"));
    let (a_hashed, c_hashed) = (
        hashed_name(&format!("{p}_plant/a")),
        hashed_name(&t.name("cursor")),
    );
    let _drop = DropTables(vec![
        owned.clone(),
        by_hand.clone(),
        a_hashed.clone(),
        c_hashed.clone(),
    ]);
    let ddl = |name: &str| {
        format!(
            "CREATE TABLE \"{name}\" (stream text NOT NULL, epoch bigint NOT NULL, seq bigint NOT NULL, \
             ts timestamptz NOT NULL, tag text NOT NULL, value double precision, value_int bigint, value_bool boolean, \
             value_text text, quality smallint NOT NULL, status text)"
        )
    };
    let mut c = db();
    c.batch_execute(&format!(
        "{}; COMMENT ON TABLE \"{owned}\" IS 'weir points for {p}_plant_a'; {}",
        ddl(&owned),
        ddl(&by_hand)
    ))
    .unwrap();
    let sink = t.sink(URL, "").replace(
        &format!("points_table = \"{}\"", t.name("points")),
        &format!("points_table = \"{p}_{{stream}}\""),
    );
    let link = Link::new();
    let mut receiver = receiver(&s, "receiver", link.receiver_port, &sink);
    let _linksim = link.linksim(&s, 0.02);
    let each = 2_000u64;
    let mut sender = sender(
        &s,
        link.sender_port,
        &format!(
            "{}{}{}",
            generator("plant/a", 2_000, each),
            generator("plant/x", 2_000, each),
            generator("cursor", 2_000, each)
        ),
    );
    let want = [
        ("plant/a", &a_hashed),
        ("plant/x", &by_hand),
        ("cursor", &c_hashed),
    ];
    for (_, table) in want {
        wait_for_rows(
            &s,
            &format!("\"{table}\""),
            each,
            Duration::from_secs(5),
            Duration::from_secs(60),
        );
    }
    assert!(
        receiver.is_running(),
        "the receiver died: {}",
        log_text(&s, "receiver")
    );
    assert!(
        sender.stop(Duration::from_secs(10)),
        "the sender did not stop cleanly"
    );
    assert!(
        receiver.stop(Duration::from_secs(20)),
        "the receiver did not stop cleanly"
    );
    let audit = s.join("audit.jsonl");
    for (stream, table) in want {
        let got = rows(&format!("\"{table}\""));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            [stream],
            "{table} holds the rows of {stream} only"
        );
        assert_exactly_accounted(&got[stream], &gaps(&audit, stream), each);
    }
    assert_eq!(
        count(&format!("\"{owned}\"")),
        0,
        "the table stream plant_a owns is left alone"
    );
    let comment = |table: &str| -> Option<String> {
        db().query_one(
            "SELECT obj_description(to_regclass($1)::oid, 'pg_class')",
            &[&format!("\"{table}\"")],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(
        comment(&a_hashed),
        Some(format!("weir points for {p}_plant/a"))
    );
    assert_eq!(
        comment(&by_hand),
        None,
        "a table made by hand is used as it is"
    );
}

#[test]
fn kill_9_of_the_receiver_mid_run_and_a_restart_write_each_row_once() {
    let test = "postgres_kill9";
    if !server_answers(test) {
        return;
    }
    let s = Scratch::new("pg-kill9");
    let t = Tables::new("kill9");
    let link = Link::new();
    let sink = t.sink(URL, "");
    let mut receiver1 = receiver(&s, "receiver-1", link.receiver_port, &sink);
    let _linksim = link.linksim(&s, 0.02);
    let total = 100_000u64;
    let mut sender = sender(&s, link.sender_port, &generator("gen", 20_000, total));
    assert!(
        wait_until(Duration::from_secs(30), || count(&t.name("points"))
            > 20_000),
        "rows arrive before the kill: {}",
        log_text(&s, "receiver-1")
    );
    receiver1.signal("KILL");
    assert!(
        wait_until(Duration::from_secs(5), || !receiver1.is_running()),
        "kill -9 did not end the receiver"
    );
    let before = count(&t.name("points"));
    std::thread::sleep(Duration::from_millis(1000));
    let mut receiver2 = receiver(&s, "receiver-2", link.receiver_port, &sink);
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish its count"
    );
    let audit = s.join("audit.jsonl");
    let lost: u64 = gaps(&audit, "gen").iter().map(|g| g.1 - g.0 + 1).sum();
    wait_for_rows(
        &s,
        &t.name("points"),
        total - lost,
        Duration::from_secs(3),
        Duration::from_secs(30),
    );
    assert!(
        receiver2.stop(Duration::from_secs(20)),
        "the restarted receiver did not stop cleanly: {}",
        log_text(&s, "receiver-2")
    );
    let written = rows(&t.name("points")).remove("gen").unwrap_or_default();
    let g = gaps(&audit, "gen");
    eprintln!(
        "rows {} (before the kill {before}), replays dropped after the restart: {:?}, gaps {g:?}",
        written.len(),
        metric(&s, "sink.pg.duplicates")
    );
    assert!(
        g.iter().all(|x| x.2 == "receiver-down"),
        "the only gaps are records sent while the receiver was down: {g:?}"
    );
    assert_exactly_accounted(&written, &g, total);
}

#[test]
fn the_server_unreachable_for_20_s_mid_run_still_gets_each_row_once() {
    let test = "postgres_outage";
    if !server_answers(test) {
        return;
    }
    let s = Scratch::new("pg-outage");
    let t = Tables::new("outage");
    let proxy = TcpProxy::start(0, 5432);
    let link = Link::new();
    let url = format!("postgres://postgres@127.0.0.1:{}/test", proxy.port);
    let mut receiver = receiver(&s, "receiver", link.receiver_port, &t.sink(&url, ""));
    let _linksim = link.linksim(&s, 0.02);
    // 25 s of records: the sender is still sending when the server is back.
    let total = 100_000u64;
    let mut sender = sender(&s, link.sender_port, &generator("gen", 4_000, total));
    assert!(
        wait_until(Duration::from_secs(30), || count(&t.name("points")) > 8_000),
        "rows arrive before the outage: {}",
        log_text(&s, "receiver")
    );
    proxy.stop();
    assert!(proxy.refuses(), "the server's port refuses connections");
    // A COMMIT already at the server when the proxy stopped still completes.
    std::thread::sleep(Duration::from_millis(300));
    let at_cut = count(&t.name("points"));
    std::thread::sleep(Duration::from_secs(20));
    let during = count(&t.name("points"));
    let errors = metric(&s, "sink.pg.errors").unwrap_or(0);
    proxy.restart();
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish its count and exit cleanly"
    );
    let got = wait_for_rows(
        &s,
        &t.name("points"),
        total,
        Duration::from_secs(5),
        Duration::from_secs(60),
    );
    assert!(
        receiver.stop(Duration::from_secs(20)),
        "the receiver did not stop cleanly"
    );
    eprintln!("rows at the cut {at_cut}, after 20 s of outage {during}, in the end {got}; sink errors during the outage {errors}");
    assert_eq!(
        at_cut, during,
        "nothing is written while the server is unreachable"
    );
    assert!(errors > 0, "the outage shows in sink.pg.errors");
    assert!(
        log_text(&s, "receiver").contains("write failed"),
        "the outage is logged"
    );
    let written = rows(&t.name("points")).remove("gen").unwrap_or_default();
    let g = gaps(&s.join("audit.jsonl"), "gen");
    assert!(g.is_empty(), "no gaps: {g:?}");
    assert_exactly_accounted(&written, &g, total);
}

#[test]
fn a_table_with_a_wrong_column_type_is_named_in_the_error_and_written_once_fixed() {
    let test = "postgres_wrong_column";
    if !server_answers(test) {
        return;
    }
    let s = Scratch::new("pg-column");
    let t = Tables::new("column");
    let points = t.name("points");
    db().batch_execute(&format!(
        "CREATE TABLE {points} (stream text, epoch bigint, seq bigint, ts timestamptz, tag text, value double precision, value_int integer, value_bool boolean, value_text text, quality smallint, status text)"
    ))
    .unwrap();
    let port = free_udp_port();
    let mut receiver = receiver(&s, "receiver", port, &t.sink(URL, ""));
    let total = 2_000u64;
    let mut sender = sender(&s, port, &generator("gen", 2_000, total));
    let want =
        format!("points_table {points}: column `value_int` is integer, this sink writes bigint");
    assert!(
        wait_until(Duration::from_secs(20), || log_text(&s, "receiver")
            .contains(&want)),
        "the error names the table and the column: {}",
        log_text(&s, "receiver")
    );
    assert_eq!(count(&points), 0);
    db().batch_execute(&format!(
        "ALTER TABLE {points} ALTER COLUMN value_int TYPE bigint"
    ))
    .unwrap();
    let got = wait_for_rows(
        &s,
        &points,
        total,
        Duration::from_secs(15),
        Duration::from_secs(40),
    );
    assert!(sender.stop(Duration::from_secs(10)));
    assert!(receiver.stop(Duration::from_secs(20)));
    let written = rows(&points).remove("gen").unwrap_or_default();
    assert_eq!(got, total);
    assert_complete_in_order(&written, total);
}

#[test]
fn timescale_makes_the_points_table_a_hypertable_or_names_the_missing_extension() {
    let test = "postgres_timescale";
    if !server_answers(test) {
        return;
    }
    let available = db()
        .query_opt(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'",
            &[],
        )
        .unwrap()
        .is_some();
    let s = Scratch::new("pg-timescale");
    let t = Tables::new("ts");
    let points = t.name("points");
    let port = free_udp_port();
    let mut receiver = receiver(&s, "receiver", port, &t.sink(URL, "timescale = true\n"));
    let total = 1_000u64;
    let mut sender = sender(&s, port, &generator("gen", 2_000, total));
    if !available {
        eprintln!("SKIPPED the hypertable half of {test}: the timescaledb extension is not available on this server; checking the error instead");
        assert!(
            wait_until(Duration::from_secs(20), || log_text(&s, "receiver")
                .contains(
                    "timescale: is true, but the timescaledb extension is not installed"
                )),
            "the missing extension is named: {}",
            log_text(&s, "receiver")
        );
        assert_eq!(
            count(&points),
            0,
            "no row before the table is what was asked for"
        );
    } else {
        db().batch_execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            .unwrap();
        let got = wait_for_rows(
            &s,
            &points,
            total,
            Duration::from_secs(5),
            Duration::from_secs(30),
        );
        assert_eq!(got, total);
        let hyper = db()
            .query_opt(
                "SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_name = $1",
                &[&points],
            )
            .unwrap();
        assert!(hyper.is_some(), "{points} is a hypertable");
    }
    assert!(sender.stop(Duration::from_secs(10)));
    assert!(receiver.stop(Duration::from_secs(20)));
}

#[test]
fn records_of_a_kind_no_sink_selects_are_counted_per_stream_and_logged_once() {
    let test = "postgres_kinds";
    if !server_answers(test) {
        return;
    }
    let s = Scratch::new("pg-kinds");
    let t = Tables::new("kinds");
    let port = free_udp_port();
    let mut receiver = receiver(&s, "receiver", port, &t.sink(URL, "kinds = [\"log\"]\n"));
    let (points, logs) = (2_000u64, 200u64);
    let syslog_port = free_tcp_port();
    let mut sender = sender(
        &s,
        port,
        &format!(
            "{}[[sources]]\nname = \"syslog\"\ntype = \"syslog\"\nlisten = \"tcp://127.0.0.1:{syslog_port}\"\n",
            generator("gen", 4_000, points)
        ),
    );
    send_logs(syslog_port, logs);
    let got = wait_for_rows(
        &s,
        &t.name("logs"),
        logs,
        Duration::from_secs(3),
        Duration::from_secs(30),
    );
    assert!(
        wait_until(Duration::from_secs(20), || metric(&s, "records_unrouted")
            == Some(points)),
        "every point is counted as unrouted: {}",
        read_json(&s.join("receiver-metrics.json"))
    );
    assert!(sender.stop(Duration::from_secs(10)));
    assert!(receiver.stop(Duration::from_secs(20)));
    assert_eq!(got, logs);
    assert_eq!(
        count(&t.name("points")),
        0,
        "no point reaches a sink that takes only logs"
    );
    let m = read_json(&s.join("receiver-metrics.json"));
    assert_eq!(
        m["records_unrouted_by_stream"]["gen"].as_u64(),
        Some(points),
        "{m}"
    );
    assert!(m["records_unrouted_by_stream"]["syslog"].is_null(), "{m}");
    let warnings = log_text(&s, "receiver")
        .matches("no sink selects this stream's point records")
        .count();
    assert_eq!(warnings, 1, "logged once for the stream");
}

/// The server's certificate file when it has TLS on (`ssl = on`; Debian's
/// cluster uses the self-signed snakeoil certificate); otherwise prints
/// why the test is skipped, or fails under WEIR_SERVICES=1.
fn server_tls_certificate(test: &str) -> Option<String> {
    let mut c = db();
    let on: String = c.query_one("SHOW ssl", &[]).unwrap().get(0);
    if on != "on" {
        if std::env::var("WEIR_SERVICES").is_ok_and(|v| v == "1") {
            panic!("{test}: WEIR_SERVICES=1 but PostgreSQL at {SERVER} has ssl = off");
        }
        eprintln!("SKIPPED {test}: PostgreSQL at {SERVER} has ssl = off");
        return None;
    }
    Some(c.query_one("SHOW ssl_cert_file", &[]).unwrap().get(0))
}

/// Whether the session of `application_name` is encrypted, as the server
/// sees it (pg_stat_ssl).
fn session_encrypted(application_name: &str) -> Option<bool> {
    db().query_opt(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1",
        &[&application_name],
    )
    .unwrap()
    .map(|r| r.get(0))
}

#[test]
fn sslmode_require_and_verify_ca_land_rows_over_tls() {
    let test = "postgres_tls";
    if !server_answers(test) {
        return;
    }
    let Some(server_cert) = server_tls_certificate(test) else {
        return;
    };
    for (mode, extra) in [
        ("require", String::new()),
        // The server's self-signed certificate is its own CA; verify-ca
        // does not check the name, which for snakeoil is the host name.
        ("verify-ca", format!("tls_ca_file = \"{server_cert}\"\n")),
    ] {
        let s = Scratch::new(&format!("pg-tls-{mode}"));
        let t = Tables::new("tls");
        let app = format!("{}_app", t.prefix);
        let url = format!("postgres://postgres@127.0.0.1:5432/test?application_name={app}");
        let port = free_udp_port();
        let mut receiver = receiver(
            &s,
            "receiver",
            port,
            &t.sink(&url, &format!("sslmode = \"{mode}\"\n{extra}")),
        );
        let total = 2_000u64;
        let mut sender = sender(&s, port, &generator("gen", 4_000, total));
        let points = t.name("points");
        let got = wait_for_rows(
            &s,
            &points,
            total,
            Duration::from_secs(15),
            Duration::from_secs(40),
        );
        assert_eq!(got, total, "sslmode {mode}: {}", log_text(&s, "receiver"));
        assert_eq!(
            session_encrypted(&app),
            Some(true),
            "sslmode {mode}: the sink's session is encrypted"
        );
        assert!(sender.stop(Duration::from_secs(10)));
        assert!(receiver.stop(Duration::from_secs(20)));
        assert_complete_in_order(&rows(&points).remove("gen").unwrap_or_default(), total);
    }
}

#[test]
fn verify_full_refuses_a_server_its_ca_file_does_not_sign_or_that_is_not_the_name_it_checks() {
    let test = "postgres_tls_refused";
    if !server_answers(test) {
        return;
    }
    let Some(server_cert) = server_tls_certificate(test) else {
        return;
    };
    let s = Scratch::new("pg-tls-refused");
    let pki = pki::Pki::new(&s);
    for (i, (extra, want)) in [
        (
            format!("tls_ca_file = \"{}\"\n", pki.ca.display()),
            vec![
                "UnknownIssuer".to_string(),
                "sslmode verify-full".to_string(),
                format!("tls_ca_file ({})", pki.ca.display()),
            ],
        ),
        (
            format!("tls_ca_file = \"{server_cert}\"\ntls_server_name = \"weir-not-the-server.invalid\"\n"),
            vec![
                "not valid for name \"weir-not-the-server.invalid\"".to_string(),
                "does not name `weir-not-the-server.invalid`".to_string(),
                "tls_server_name".to_string(),
            ],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let t = Tables::new("tlsno");
        let port = free_udp_port();
        let log = format!("receiver-{i}");
        let mut receiver = receiver(
            &s,
            &log,
            port,
            &t.sink(URL, &format!("sslmode = \"verify-full\"\n{extra}")),
        );
        let mut sender = sender(&s, port, &generator("gen", 2_000, 500));
        assert!(
            wait_until(Duration::from_secs(20), || {
                let text = log_text(&s, &log);
                want.iter().all(|w| text.contains(w.as_str()))
            }),
            "the refusal names {want:?}: {}",
            log_text(&s, &log)
        );
        assert_eq!(count(&t.name("points")), 0, "nothing is written to an unverified server");
        assert!(sender.stop(Duration::from_secs(10)));
        assert!(receiver.stop(Duration::from_secs(20)));
        let _ = std::fs::remove_dir_all(s.join("spool"));
        let _ = std::fs::remove_dir_all(s.join("state"));
    }
}
