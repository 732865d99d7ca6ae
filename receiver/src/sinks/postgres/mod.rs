//! `postgres`: rows in PostgreSQL (or TimescaleDB), exactly once.
//!
//! Points, messages, logs and byte chunks each go to their own table
//! (created if absent; the DDL is in docs/sinks.md), or with a template
//! (`points_table = "weir_{stream}"`) to a table per stream (per tag,
//! per MQTT topic; `table_name.rs`), created on first use. Each `write`
//! is one transaction: a binary COPY per table, then the sink's position per
//! (stream, epoch) upserted into the cursor table, then COMMIT. The rows
//! and the positions commit or vanish together, so after any failure
//! (a crash, a cut connection, a COMMIT whose answer was lost) the sink
//! reconnects, reads the positions back and skips every record at or
//! below them: nothing is written twice, and nothing is skipped that was
//! not committed. Records resent to fill an old gap (which do not move a
//! position) are looked up in their table by (stream, epoch, seq) first.
//!
//! A record PostgreSQL cannot store (a NUL character in a text field, a
//! sequence past the bigint range) goes to the dead-letter file.
//!
//! TLS (`sslmode`, `tls_*` keys) is in `tls.rs`. The password and the TLS
//! files are read at start and on SIGHUP; each new connection uses what
//! was read last.

mod table_name;
mod tls;

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls};
use weir_ops::reload::Reloadable;

use table_name::{TableSpec, MAX_IDENT};
use tls::{SslMode, TlsSettings};
use weir_protocol::decoder::Delivered;
use weir_protocol::RecordBody;

use super::{AsyncSink, BuildContext, Position, Sink, SinkBuilder, SinkError};

/// The longest a connection may take to be set up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most tables the sink remembers as created and checked. Past it the
/// memory is emptied and each table is checked again on its next use, so
/// a `{tag}` template over many tags cannot grow it without bound; 4096
/// names and their SQL stay well under a megabyte.
const MAX_TABLES: usize = 4096;

/// The advisory lock (`pg_advisory_xact_lock`) every weir receiver on the
/// database holds while it picks a templated table's name and creates the
/// table, so two sinks never both claim one name. "weir_tbl" in ASCII.
const NAMES_LOCK: i64 = 0x7765_6972_5f74_626c;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `postgres://user@host[:port]/database` (or key=value form).
    pub url: String,
    /// File holding the password (one line, mode 0600), read at start and
    /// on SIGHUP; overrides a password in `url`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// `disable`, `prefer`, `require`, `verify-ca` or `verify-full`, as
    /// libpq reads them (see `tls.rs`). Unset: `sslmode` in `url`, else
    /// `prefer`.
    #[serde(default)]
    pub sslmode: Option<String>,
    /// PEM CA certificates that sign the server's certificate
    /// (`verify-ca`, `verify-full`, and `require` when set); default for
    /// `verify-*`: the system roots.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// `verify-full`: the name the server's certificate must carry, when
    /// it is not the host in `url`.
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// TLS client authentication: certificate chain (PEM) and private key
    /// (PEM, mode 0600); both or neither.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// `table`, `schema.table`, or a template (`weir_{stream}`,
    /// `plant.weir_{stream}_{tag}`; see `table_name.rs`).
    #[serde(default = "default_points")]
    pub points_table: String,
    /// As `points_table`; `{stream}` and `{topic}` (the MQTT topic).
    #[serde(default = "default_messages")]
    pub messages_table: String,
    /// As `points_table`; `{stream}` only.
    #[serde(default = "default_logs")]
    pub logs_table: String,
    /// As `points_table`; `{stream}` only.
    #[serde(default = "default_bytes")]
    pub bytes_table: String,
    /// Each stream's last committed (epoch, seq) for this sink.
    #[serde(default = "default_cursor")]
    pub cursor_table: String,
    /// Make the points table a TimescaleDB hypertable on `ts` (the
    /// extension must be installed in the database).
    #[serde(default)]
    pub timescale: bool,
}

fn default_points() -> String {
    "weir_points".into()
}
fn default_messages() -> String {
    "weir_messages".into()
}
fn default_logs() -> String {
    "weir_logs".into()
}
fn default_bytes() -> String {
    "weir_bytes".into()
}
fn default_cursor() -> String {
    "weir_cursor".into()
}

/// `table` or `schema.table`, each part a plain identifier (letters,
/// digits, `_`, not starting with a digit), so it needs no quoting.
fn check_table(key: &str, name: &str) -> Result<(), String> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 || !parts.iter().all(|p| table_name::plain_ident(p)) {
        return Err(format!(
            "{key}: `{name}` must be a table name or schema.table of letters, digits and `_` (e.g. \"weir_points\")"
        ));
    }
    Ok(())
}

impl Config {
    /// The four record table keys, read and checked against each other
    /// (a templated one against fixed names is settled per name, at run).
    fn specs(&self) -> Result<[TableSpec; 4], String> {
        let mut specs = Vec::with_capacity(4);
        for t in Table::ALL {
            let spec = TableSpec::parse(t.key(), t.name(self), t.placeholders())?;
            if let TableSpec::Fixed(name) = &spec {
                check_table(t.key(), name)?;
            }
            specs.push(spec);
        }
        check_table("cursor_table", &self.cursor_table)?;
        let keyed: Vec<(&str, &TableSpec)> =
            Table::ALL.iter().map(|t| t.key()).zip(&specs).collect();
        table_name::check_overlap(&keyed)?;
        specs
            .try_into()
            .map_err(|_| "four record tables".to_string())
    }

    fn tables(&self) -> [(&'static str, &str); 5] {
        [
            ("points_table", &self.points_table),
            ("messages_table", &self.messages_table),
            ("logs_table", &self.logs_table),
            ("bytes_table", &self.bytes_table),
            ("cursor_table", &self.cursor_table),
        ]
    }

    /// The connection settings from `url`, with the `sslmode` in force
    /// (the password and TLS files are read by [`Config::secrets`]).
    fn pg_config(&self) -> Result<tokio_postgres::Config, String> {
        let mut c = tokio_postgres::Config::from_str(&self.url).map_err(|e| {
            let hint = if self.url.contains("sslmode=verify") {
                "; set verify-ca / verify-full with this sink's `sslmode` key, not in `url`"
            } else {
                ""
            };
            format!(
                "url: `{}` is not a PostgreSQL connection string ({e}){hint}; e.g. \"postgres://weir@db.example/plant\"",
                redact(&self.url)
            )
        })?;
        if c.get_hosts().is_empty() {
            return Err(format!("url: `{}` names no host", redact(&self.url)));
        }
        c.ssl_mode(self.tls()?.mode.pg())
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));
        if c.get_application_name().is_none() {
            c.application_name("weir-receiver");
        }
        Ok(c)
    }

    /// The TLS settings: `sslmode` (or the one in `url`, or `prefer`) and
    /// the `tls_*` keys, checked against each other.
    fn tls(&self) -> Result<TlsSettings, String> {
        let mode = match &self.sslmode {
            Some(m) => {
                if self.url.contains("sslmode=") {
                    return Err(
                        "sslmode: is set in `url` too; keep one (this key knows verify-ca and verify-full)"
                            .into(),
                    );
                }
                SslMode::parse(m)?
            }
            None => tokio_postgres::Config::from_str(&self.url)
                .map(|c| SslMode::from_pg(c.get_ssl_mode()))
                .unwrap_or(SslMode::Prefer),
        };
        let set = [
            ("tls_ca_file", self.tls_ca_file.is_some()),
            ("tls_server_name", self.tls_server_name.is_some()),
            ("tls_cert_file", self.tls_cert_file.is_some()),
            ("tls_key_file", self.tls_key_file.is_some()),
        ];
        if mode == SslMode::Disable {
            if let Some((key, _)) = set.iter().find(|(_, on)| *on) {
                return Err(format!("{key}: is set but sslmode is `disable`"));
            }
        }
        if mode == SslMode::Prefer && self.tls_ca_file.is_some() {
            return Err("tls_ca_file: sslmode `prefer` never checks the server's certificate; use sslmode = \"verify-full\" (or \"verify-ca\")".into());
        }
        if self.tls_server_name.is_some() && mode != SslMode::VerifyFull {
            return Err(format!(
                "tls_server_name: only sslmode `verify-full` checks the name; sslmode is `{mode}`"
            ));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(
                "tls_cert_file and tls_key_file: set both (client authentication) or neither"
                    .into(),
            );
        }
        let ca = match mode {
            SslMode::VerifyCa | SslMode::VerifyFull => Some(
                self.tls_ca_file
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(tls::SYSTEM_CA_FILE)),
            ),
            _ => self.tls_ca_file.clone(),
        };
        Ok(TlsSettings {
            mode,
            ca,
            client: self.tls_cert_file.clone().zip(self.tls_key_file.clone()),
        })
    }

    /// Reads the password and TLS files.
    fn secrets(&self) -> Result<Secrets> {
        let password = match &self.password_file {
            Some(p) => Some(weir_store::secret::read_secret_line(p, "password_file")?),
            None => None,
        };
        let tls = self.tls().map_err(|e| anyhow!(e))?.client_config()?;
        Ok(Secrets { password, tls })
    }
}

/// What the sink reads from files, at start and on SIGHUP.
struct Secrets {
    password: Option<String>,
    /// `None` for sslmode `disable`.
    tls: Option<tokio_rustls::rustls::ClientConfig>,
}

/// `url` without a password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl SinkBuilder for Config {
    const TYPE: &'static str = "postgres";

    fn validate(&self) -> Result<(), String> {
        self.specs()?;
        let mut names: Vec<&str> = self.tables().iter().map(|t| t.1).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(format!(
                "points_table: the five tables (points, messages, logs, bytes, cursor) must differ; got {:?}",
                self.tables().map(|t| t.1)
            ));
        }
        self.pg_config()?;
        self.secrets().map(|_| ()).map_err(|e| format!("{e:#}"))
    }

    /// Connects in the first `write`, not here.
    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Sink>> {
        let pg = self.pg_config().map_err(|e| anyhow!(e))?;
        let tls = self.tls().map_err(|e| anyhow!(e))?;
        let mut files = tls.files();
        if let Some(p) = &self.password_file {
            files.insert(0, ("password_file", p.as_path()));
        }
        let cfg = self.clone();
        let secrets = ctx.reloadable(files, move || cfg.secrets())?;
        let specs = self.specs().map_err(|e| anyhow!(e))?;
        ctx.async_sink(PostgresSink {
            cfg: self.clone(),
            specs,
            pg,
            tls,
            secrets,
            name: ctx.name().to_string(),
            client: None,
            stored: HashMap::new(),
            tables: HashMap::new(),
        })
    }
}

/// The four record tables, in [`Table`] order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Table {
    Points = 0,
    Messages = 1,
    Logs = 2,
    Bytes = 3,
}

impl Table {
    fn of(body: &RecordBody) -> Table {
        match body {
            RecordBody::Point(_) => Table::Points,
            RecordBody::Message(_) => Table::Messages,
            RecordBody::Log(_) => Table::Logs,
            RecordBody::Bytes(_) => Table::Bytes,
            // `unstorable` rejects file parts before a table is looked up.
            RecordBody::File(_) => unreachable!("a file part has no table"),
        }
    }

    const ALL: [Table; 4] = [Table::Points, Table::Messages, Table::Logs, Table::Bytes];

    fn key(self) -> &'static str {
        [
            "points_table",
            "messages_table",
            "logs_table",
            "bytes_table",
        ][self as usize]
    }

    /// The placeholders this kind's table template may use.
    fn placeholders(self) -> &'static [&'static str] {
        match self {
            Table::Points => &["stream", "tag"],
            Table::Messages => &["stream", "topic"],
            Table::Logs | Table::Bytes => &["stream"],
        }
    }

    fn name(self, cfg: &Config) -> &str {
        match self {
            Table::Points => &cfg.points_table,
            Table::Messages => &cfg.messages_table,
            Table::Logs => &cfg.logs_table,
            Table::Bytes => &cfg.bytes_table,
        }
    }

    /// Columns after the common `stream, epoch, seq, ts`: name, SQL type
    /// as `information_schema` spells it, the binary COPY type, NOT NULL.
    fn columns(self) -> &'static [(&'static str, &'static str, Type, bool)] {
        match self {
            Table::Points => &[
                ("tag", "text", Type::TEXT, true),
                ("value", "double precision", Type::FLOAT8, false),
                ("value_int", "bigint", Type::INT8, false),
                ("value_bool", "boolean", Type::BOOL, false),
                ("value_text", "text", Type::TEXT, false),
                ("quality", "smallint", Type::INT2, true),
                ("status", "text", Type::TEXT, false),
            ],
            Table::Messages => &[
                ("topic", "text", Type::TEXT, true),
                ("payload", "bytea", Type::BYTEA, true),
                ("retain", "boolean", Type::BOOL, true),
                ("qos", "smallint", Type::INT2, true),
                ("properties", "jsonb", Type::JSONB, false),
                ("origin", "text", Type::TEXT, false),
            ],
            Table::Logs => &[
                ("facility", "smallint", Type::INT2, true),
                ("severity", "smallint", Type::INT2, true),
                ("host", "text", Type::TEXT, true),
                ("app", "text", Type::TEXT, true),
                ("text", "text", Type::TEXT, true),
                ("proc_id", "text", Type::TEXT, true),
                ("msg_id", "text", Type::TEXT, true),
                ("structured_data", "jsonb", Type::JSONB, false),
                ("parse_error", "text", Type::TEXT, false),
            ],
            Table::Bytes => &[
                ("data", "bytea", Type::BYTEA, true),
                ("ended", "boolean", Type::BOOL, true),
            ],
        }
    }

    /// Every column: the common four, then [`Table::columns`].
    fn all_columns(self) -> Vec<(&'static str, &'static str, Type, bool)> {
        let mut c = vec![
            ("stream", "text", Type::TEXT, true),
            ("epoch", "bigint", Type::INT8, true),
            ("seq", "bigint", Type::INT8, true),
            ("ts", "timestamp with time zone", Type::TIMESTAMPTZ, true),
        ];
        c.extend(self.columns().iter().cloned());
        c
    }

    /// The DDL for a table named as written (`table`, `schema.table`),
    /// its index named `<table>_stream_epoch_seq`, unquoted.
    fn ddl(self, table: &str) -> String {
        let bare = table.rsplit('.').next().unwrap_or(table);
        self.ddl_named(table, &format!("{bare}_stream_epoch_seq"))
    }

    /// The DDL with the table and its index as SQL names them.
    fn ddl_named(self, table: &str, index: &str) -> String {
        let cols: Vec<String> = self
            .all_columns()
            .iter()
            .map(|(n, t, _, not_null)| {
                let t = if *t == "timestamp with time zone" {
                    "timestamptz"
                } else {
                    t
                };
                format!("{n} {t}{}", if *not_null { " NOT NULL" } else { "" })
            })
            .collect();
        format!(
            "CREATE TABLE IF NOT EXISTS {table} ({});\nCREATE INDEX IF NOT EXISTS {index} ON {table} (stream, epoch, seq)",
            cols.join(", ")
        )
    }
}

/// The cursor table's DDL.
fn cursor_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (sink text NOT NULL, stream text NOT NULL, epoch bigint NOT NULL, seq bigint NOT NULL, updated timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (sink, stream, epoch))"
    )
}

/// `(schema, table)` as the catalog holds a plain name (lowercased).
fn split_table(table: &str) -> (Option<String>, String) {
    match table.split_once('.') {
        Some((s, t)) => (Some(s.to_ascii_lowercase()), t.to_ascii_lowercase()),
        None => (None, table.to_ascii_lowercase()),
    }
}

/// A record table the sink writes: how SQL names it and where the
/// catalog has it.
#[derive(Debug)]
struct Dest {
    /// `weir_points`, `plant.weir_points` (a fixed name, as written) or
    /// `"plant"."weir_plant_a"` (a templated one, quoted).
    sql: String,
    /// The schema (none: the search path's first) and the table's name
    /// in the catalog.
    schema: Option<String>,
    name: String,
}

impl Dest {
    fn fixed(text: &str) -> Dest {
        let (schema, name) = split_table(text);
        Dest {
            sql: text.to_string(),
            schema,
            name,
        }
    }

    fn templated(schema: Option<String>, name: String) -> Dest {
        let sql = match &schema {
            Some(s) => format!("{}.{}", table_name::quote(s), table_name::quote(&name)),
            None => table_name::quote(&name),
        };
        Dest { sql, schema, name }
    }
}

/// A PostgreSQL error with the table, column, detail and hint the server
/// gave, so the message says what to fix.
fn describe(e: &tokio_postgres::Error, doing: &str) -> anyhow::Error {
    let Some(db) = e.as_db_error() else {
        // tokio-postgres puts the cause (a refused connection, a TLS
        // error) in its source, not in its message.
        let mut m = format!("{doing}: {e}");
        let mut source = std::error::Error::source(e);
        while let Some(inner) = source {
            m.push_str(&format!(": {inner}"));
            source = inner.source();
        }
        return anyhow!(m);
    };
    let mut m = format!("{doing}: {} (SQLSTATE {})", db.message(), db.code().code());
    if let Some(t) = db.table() {
        m.push_str(&format!("; table {t}"));
    }
    if let Some(c) = db.column() {
        m.push_str(&format!(", column {c}"));
    }
    if let Some(d) = db.detail() {
        m.push_str(&format!("; {d}"));
    }
    if let Some(h) = db.hint() {
        m.push_str(&format!("; hint: {h}"));
    }
    if let Some(w) = db.where_() {
        m.push_str(&format!("; at {w}"));
    }
    anyhow!(m)
}

struct PostgresSink {
    cfg: Config,
    /// `url` and `sslmode`; the password is added at each connect.
    pg: tokio_postgres::Config,
    tls: TlsSettings,
    /// The password and TLS client settings; SIGHUP may replace them.
    secrets: std::sync::Arc<Reloadable<Secrets>>,
    name: String,
    /// The open connection; taken out for the length of a write, so a
    /// write cut off at any await drops it (the server rolls back).
    client: Option<Client>,
    /// What the cursor table holds for this sink: per stream, the last
    /// seq of each epoch. Re-read on every new connection, updated after
    /// every COMMIT.
    stored: HashMap<String, Vec<(u64, u64)>>,
    /// The record table keys, read.
    specs: [TableSpec; 4],
    /// Tables created (if absent) and checked since start, by kind and
    /// template expansion (empty for a fixed name); at most [`MAX_TABLES`].
    tables: HashMap<(Table, String), Arc<Dest>>,
}

impl PostgresSink {
    async fn connect(&mut self) -> Result<Client> {
        let secrets = self.secrets.get();
        let mut pg = self.pg.clone();
        if let Some(p) = &secrets.password {
            pg.password(p.as_str());
        }
        let name = self.name.clone();
        let failed = |e: tokio_postgres::Error| {
            let host = match pg.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                _ => String::new(),
            };
            let shown = self.cfg.tls_server_name.clone().unwrap_or(host);
            anyhow!(self.tls.explain(
                format!("{:#}", describe(&e, "connecting to PostgreSQL")),
                &shown
            ))
        };
        let client = match &secrets.tls {
            None => {
                let (client, connection) = pg.connect(NoTls).await.map_err(failed)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(sink = %name, "postgres connection ended: {e}");
                    }
                });
                client
            }
            Some(config) => {
                let connector =
                    tls::Connector::new(config.clone(), self.cfg.tls_server_name.clone());
                let (client, connection) = pg.connect(connector).await.map_err(failed)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(sink = %name, "postgres connection ended: {e}");
                    }
                });
                client
            }
        };
        let cursor = &self.cfg.cursor_table;
        client
            .batch_execute(&cursor_ddl(cursor))
            .await
            .map_err(|e| describe(&e, &format!("cursor_table {cursor}: creating it")))?;
        let rows = client
            .query(
                &format!(
                    "SELECT stream, epoch, seq FROM {cursor} WHERE sink = $1 ORDER BY updated"
                ),
                &[&self.name],
            )
            .await
            .map_err(|e| describe(&e, &format!("cursor_table {cursor}: reading it")))?;
        self.stored.clear();
        for row in rows {
            let (stream, epoch, seq): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
            self.remember(stream, epoch as u64, seq as u64);
        }
        Ok(client)
    }

    /// The table `r` goes to, created (if absent) and checked on its
    /// first use since start.
    async fn destination(&mut self, client: &mut Client, r: &Delivered) -> Result<Arc<Dest>> {
        let table = Table::of(&r.body);
        let spec = &self.specs[table as usize];
        let raw = match spec {
            TableSpec::Fixed(_) => String::new(),
            TableSpec::Template { table: t, .. } => t.render(r, |v, out| out.push_str(v)),
        };
        let key = (table, raw);
        if let Some(d) = self.tables.get(&key) {
            return Ok(d.clone());
        }
        let dest = match spec {
            TableSpec::Fixed(text) => {
                let dest = Dest::fixed(text);
                client
                    .batch_execute(&table.ddl(text))
                    .await
                    .map_err(|e| describe(&e, &format!("{} {text}: creating it", table.key())))?;
                dest
            }
            TableSpec::Template { schema, .. } => {
                let schema = schema.as_ref().map(|s| s.to_ascii_lowercase());
                self.resolve(client, table, schema, &key.1).await?
            }
        };
        self.prepare(client, table, &dest).await?;
        if self.tables.len() >= MAX_TABLES {
            tracing::debug!(sink = %self.name, "postgres: {MAX_TABLES} tables remembered; forgetting them, each is checked again on its next use");
            self.tables.clear();
        }
        let dest = Arc::new(dest);
        self.tables.insert(key, dest.clone());
        Ok(dest)
    }

    /// True when `name` in `schema` is what a fixed table key (of any
    /// kind, or `cursor_table`) may name.
    fn fixed_name(&self, schema: &Option<String>, name: &str) -> bool {
        self.specs
            .iter()
            .filter_map(|s| match s {
                TableSpec::Fixed(t) => Some(t.as_str()),
                TableSpec::Template { .. } => None,
            })
            .chain([self.cfg.cursor_table.as_str()])
            .any(|t| {
                let (s, n) = split_table(t);
                n == name && table_name::same_schema(&s, schema)
            })
    }

    /// Picks the table for the template expansion `raw` and creates it if
    /// absent, under [`NAMES_LOCK`], in one transaction. Each table the
    /// sink creates carries the comment `weir <kind> for <raw>`, which is
    /// how a later pick (after a restart too) knows whose it is:
    /// 1. the clean name (docs/sinks.md), when its comment is ours;
    /// 2. the hashed name, when its comment is ours;
    /// 3. the clean name, when no table has it (created, with our
    ///    comment) or the table there has no comment (made by hand; used
    ///    as it is) — unless a fixed table key names it;
    /// 4. the hashed name, likewise;
    /// 5. else an error naming both.
    async fn resolve(
        &self,
        client: &mut Client,
        table: Table,
        schema: Option<String>,
        raw: &str,
    ) -> Result<Dest> {
        let key = table.key();
        let mark = format!("weir {} for {raw}", key.trim_end_matches("_table"));
        let clean = table_name::clean(raw).filter(|c| !self.fixed_name(&schema, c));
        let hashed = table_name::hashed(raw);
        debug_assert!(hashed.len() <= MAX_IDENT);
        let doing = format!("{key}: picking the table for `{raw}`");
        let tx = client
            .transaction()
            .await
            .map_err(|e| describe(&e, &doing))?;
        tx.query("SELECT pg_advisory_xact_lock($1)", &[&NAMES_LOCK])
            .await
            .map_err(|e| describe(&e, &doing))?;
        let names: Vec<&str> = clean
            .iter()
            .map(String::as_str)
            .chain([hashed.as_str()])
            .collect();
        let found: HashMap<String, Option<String>> = tx
            .query(
                "SELECT c.relname::text, obj_description(c.oid, 'pg_class') FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname::text = coalesce($1::text, current_schema()::text) AND c.relname::text = ANY($2::text[])",
                &[&schema, &names],
            )
            .await
            .map_err(|e| describe(&e, &doing))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let ours = |n: &str| matches!(found.get(n), Some(Some(m)) if *m == mark);
        let free = |n: &str| matches!(found.get(n), None | Some(None));
        let (name, create) = match clean {
            Some(c) if ours(&c) => (c, false),
            _ if ours(&hashed) => (hashed, false),
            Some(c) if free(&c) => {
                let create = !found.contains_key(&c);
                (c, create)
            }
            _ if free(&hashed) => {
                let create = !found.contains_key(&hashed);
                (hashed, create)
            }
            clean => {
                return Err(anyhow!(
                    "{key}: `{raw}` maps to {} and to {hashed}, and tables of other names hold both (their comments say whose); rename or drop one of them (the name rule is in docs/sinks.md)",
                    clean.unwrap_or_else(|| "no clean name".into())
                ))
            }
        };
        let dest = Dest::templated(schema, name);
        if create {
            let index = table_name::quote(&table_name::index_name(&dest.name));
            let sql = format!(
                "{};\nCOMMENT ON TABLE {} IS {}",
                table.ddl_named(&dest.sql, &index),
                dest.sql,
                table_name::literal(&mark)
            );
            tx.batch_execute(&sql)
                .await
                .map_err(|e| describe(&e, &format!("{key} {}: creating it", dest.sql)))?;
            tracing::info!(sink = %self.name, "postgres: {key}: created table {} for `{raw}`", dest.sql);
        }
        tx.commit().await.map_err(|e| describe(&e, &doing))?;
        Ok(dest)
    }

    /// Checks that every column this sink writes is in `dest` with its
    /// type (the error names table and column), and makes a points table
    /// a hypertable when `timescale` says so.
    async fn prepare(&self, client: &Client, table: Table, dest: &Dest) -> Result<()> {
        let name = &dest.sql;
        let key = table.key();
        let (schema, bare) = (&dest.schema, &dest.name);
        let rows = client
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns \
                 WHERE table_schema::text = coalesce($1::text, current_schema()::text) AND table_name::text = $2::text",
                &[&schema, &bare],
            )
            .await
            .map_err(|e| describe(&e, &format!("{key} {name}: reading its columns")))?;
        let have: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        for (col, ty, _, _) in table.all_columns() {
            match have.get(col) {
                None => {
                    return Err(anyhow!(
                        "{key} {name}: column `{col}` is missing; add it (`ALTER TABLE {name} ADD COLUMN {col} {ty}`) or point {key} at a new table (the DDL is in docs/sinks.md)"
                    ))
                }
                Some(t) if t != ty => {
                    return Err(anyhow!(
                        "{key} {name}: column `{col}` is {t}, this sink writes {ty}; alter the column or point {key} at a new table (the DDL is in docs/sinks.md)"
                    ))
                }
                Some(_) => {}
            }
        }
        if table == Table::Points && self.cfg.timescale {
            let ext = client
                .query_opt(
                    "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'",
                    &[],
                )
                .await
                .map_err(|e| describe(&e, "timescale: looking for the timescaledb extension"))?;
            if ext.is_none() {
                return Err(anyhow!(
                    "timescale: is true, but the timescaledb extension is not installed in this database; run `CREATE EXTENSION timescaledb` as a superuser, or set timescale = false"
                ));
            }
            client
                .query(
                    "SELECT create_hypertable($1::text::regclass, 'ts', if_not_exists => TRUE, migrate_data => TRUE)",
                    &[&name],
                )
                .await
                .map_err(|e| describe(&e, &format!("timescale: making {name} a hypertable")))?;
        }
        Ok(())
    }

    /// True when the cursor table says `r` is committed (not for resent
    /// records, which are looked up in their table).
    fn is_stored(&self, r: &Delivered) -> bool {
        !r.resent
            && self.stored.get(&*r.stream).is_some_and(|epochs| {
                epochs
                    .iter()
                    .any(|(epoch, seq)| *epoch == r.epoch && r.seq <= *seq)
            })
    }

    fn remember(&mut self, stream: String, epoch: u64, seq: u64) {
        let epochs = self.stored.entry(stream).or_default();
        match epochs.iter_mut().find(|(e, _)| *e == epoch) {
            Some((_, s)) => *s = (*s).max(seq),
            None => epochs.push((epoch, seq)),
        }
    }

    /// One transaction: resent records not yet in their table, a COPY per
    /// table, the positions, COMMIT.
    async fn commit(&self, client: &mut Client, records: &[(&Delivered, Arc<Dest>)]) -> Result<()> {
        let tx = client
            .transaction()
            .await
            .map_err(|e| describe(&e, "BEGIN"))?;
        // Rows per table, in the order the records came.
        let mut groups: Vec<(Table, Arc<Dest>, Vec<&Delivered>)> = Vec::new();
        let mut group_of: HashMap<&str, usize> = HashMap::new();
        for (r, dest) in records {
            let table = Table::of(&r.body);
            if r.resent {
                let name = &dest.sql;
                let found = tx
                    .query_opt(
                        &format!(
                            "SELECT 1 FROM {name} WHERE stream = $1 AND epoch = $2 AND seq = $3"
                        ),
                        &[&&*r.stream, &(r.epoch as i64), &(r.seq as i64)],
                    )
                    .await
                    .map_err(|e| {
                        describe(
                            &e,
                            &format!("{} {name}: looking up a resent record", table.key()),
                        )
                    })?;
                if found.is_some() {
                    continue;
                }
            }
            let g = *group_of.entry(dest.sql.as_str()).or_insert_with(|| {
                groups.push((table, dest.clone(), Vec::new()));
                groups.len() - 1
            });
            groups[g].2.push(r);
        }
        // Points, messages, logs, bytes, as before templates.
        groups.sort_by_key(|g| g.0 as usize);
        let now = SystemTime::now();
        for (table, dest, rows) in &groups {
            let name = &dest.sql;
            let cols = table.all_columns();
            let names: Vec<&str> = cols.iter().map(|c| c.0).collect();
            let types: Vec<Type> = cols.iter().map(|c| c.2.clone()).collect();
            let doing = format!("{} {name}: COPY", table.key());
            let sink = tx
                .copy_in(&format!(
                    "COPY {name} ({}) FROM STDIN (FORMAT binary)",
                    names.join(", ")
                ))
                .await
                .map_err(|e| describe(&e, &doing))?;
            let writer = BinaryCopyInWriter::new(sink, &types);
            tokio::pin!(writer);
            for r in rows.iter() {
                write_row(writer.as_mut(), r, now)
                    .await
                    .map_err(|e| describe(&e, &doing))?;
            }
            writer.finish().await.map_err(|e| describe(&e, &doing))?;
        }
        let records: Vec<&Delivered> = records.iter().map(|(r, _)| *r).collect();
        let positions = positions_by_epoch(&records);
        if !positions.is_empty() {
            let cursor = &self.cfg.cursor_table;
            let streams: Vec<&str> = positions.iter().map(|p| p.stream.as_str()).collect();
            let epochs: Vec<i64> = positions.iter().map(|p| p.epoch as i64).collect();
            let seqs: Vec<i64> = positions.iter().map(|p| p.seq as i64).collect();
            tx.execute(
                &format!(
                    "INSERT INTO {cursor} (sink, stream, epoch, seq, updated) \
                     SELECT $1, s, e, q, now() FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS t(s, e, q) \
                     ON CONFLICT (sink, stream, epoch) DO UPDATE SET seq = GREATEST({cursor}.seq, EXCLUDED.seq), updated = now()"
                ),
                &[&self.name, &streams, &epochs, &seqs],
            )
            .await
            .map_err(|e| describe(&e, &format!("cursor_table {cursor}: storing positions")))?;
        }
        tx.commit().await.map_err(|e| describe(&e, "COMMIT"))?;
        Ok(())
    }
}

/// The last (highest) sequence each (stream, epoch) reaches with
/// `records`, resent records aside: unlike [`super::positions_after`],
/// which keeps one position per stream, a batch that crosses a sequence
/// reset stores the old epoch's end too, so its replay is recognised.
fn positions_by_epoch(records: &[&Delivered]) -> Vec<Position> {
    let mut out: Vec<Position> = Vec::new();
    for r in records.iter().filter(|r| !r.resent) {
        match out
            .iter_mut()
            .rev()
            .find(|p| p.epoch == r.epoch && *p.stream == *r.stream)
        {
            Some(p) => p.seq = p.seq.max(r.seq),
            None => out.push(Position {
                stream: r.stream.to_string(),
                epoch: r.epoch,
                seq: r.seq,
            }),
        }
    }
    out
}

/// Nanoseconds since the Unix epoch as a time (PostgreSQL keeps
/// microseconds).
fn time_of(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// `[["name","value"],...]` as jsonb, or NULL when empty.
fn pairs_json(pairs: &[(String, String)]) -> Option<serde_json::Value> {
    (!pairs.is_empty()).then(|| {
        serde_json::Value::Array(
            pairs
                .iter()
                .map(|(k, v)| serde_json::json!([k, v]))
                .collect(),
        )
    })
}

async fn write_row(
    writer: std::pin::Pin<&mut BinaryCopyInWriter>,
    r: &Delivered,
    now: SystemTime,
) -> Result<(), tokio_postgres::Error> {
    let stream: &str = &r.stream;
    let epoch = r.epoch as i64;
    let seq = r.seq as i64;
    let ts = r.body.timestamp_ns().map_or(now, time_of);
    let head: [&(dyn ToSql + Sync); 4] = [&stream, &epoch, &seq, &ts];
    match &r.body {
        RecordBody::Point(p) => {
            use weir_protocol::Value as V;
            let (value, value_int, value_bool, value_text): (
                Option<f64>,
                Option<i64>,
                Option<bool>,
                Option<&str>,
            ) = match &p.value {
                V::F64(f) => (Some(*f), None, None, None),
                V::I64(i) => (Some(*i as f64), Some(*i), None, None),
                V::Bool(b) => (Some(f64::from(u8::from(*b))), None, Some(*b), None),
                V::Str(s) => (None, None, None, Some(s)),
            };
            let quality = i16::from(p.quality);
            let status = p.status.as_deref();
            let tag: &str = &p.tag;
            let row: Vec<&(dyn ToSql + Sync)> = head
                .into_iter()
                .chain([
                    &tag as &(dyn ToSql + Sync),
                    &value,
                    &value_int,
                    &value_bool,
                    &value_text,
                    &quality,
                    &status,
                ])
                .collect();
            writer.write(&row).await
        }
        RecordBody::Message(m) => {
            let topic: &str = &m.topic;
            let payload: &[u8] = &m.payload;
            let qos = i16::from(m.qos);
            let properties = pairs_json(&m.properties);
            let origin = m.origin.as_deref();
            let row: Vec<&(dyn ToSql + Sync)> = head
                .into_iter()
                .chain([
                    &topic as &(dyn ToSql + Sync),
                    &payload,
                    &m.retain,
                    &qos,
                    &properties,
                    &origin,
                ])
                .collect();
            writer.write(&row).await
        }
        RecordBody::Log(l) => {
            let (facility, severity) = (i16::from(l.facility), i16::from(l.severity));
            let sd = (!l.structured_data.is_empty()).then(|| {
                serde_json::Value::Object(
                    l.structured_data
                        .iter()
                        .map(|e| {
                            (
                                e.id.clone(),
                                pairs_json(&e.params).unwrap_or(serde_json::json!([])),
                            )
                        })
                        .collect(),
                )
            });
            let (host, app, text, proc_id, msg_id): (&str, &str, &str, &str, &str) =
                (&l.host, &l.app, &l.text, &l.proc_id, &l.msg_id);
            let parse_error = l.parse_error.as_deref();
            let row: Vec<&(dyn ToSql + Sync)> = head
                .into_iter()
                .chain([
                    &facility as &(dyn ToSql + Sync),
                    &severity,
                    &host,
                    &app,
                    &text,
                    &proc_id,
                    &msg_id,
                    &sd,
                    &parse_error,
                ])
                .collect();
            writer.write(&row).await
        }
        RecordBody::Bytes(c) => {
            let data: &[u8] = &c.data;
            let row: Vec<&(dyn ToSql + Sync)> = head
                .into_iter()
                .chain([&data as &(dyn ToSql + Sync), &c.end])
                .collect();
            writer.write(&row).await
        }
        RecordBody::File(_) => unreachable!("`unstorable` rejects file parts"),
    }
}

/// Why PostgreSQL could never store `r`, if so.
fn unstorable(r: &Delivered) -> Option<String> {
    if i64::try_from(r.seq).is_err() {
        return Some(format!("seq {} does not fit a bigint column", r.seq));
    }
    let texts: Vec<(&str, &str)> = match &r.body {
        RecordBody::Point(p) => {
            let mut t = vec![("tag", p.tag.as_str())];
            if let weir_protocol::Value::Str(s) = &p.value {
                t.push(("value_text", s));
            }
            if let Some(s) = &p.status {
                t.push(("status", s));
            }
            t
        }
        RecordBody::Message(m) => {
            let mut t = vec![("topic", m.topic.as_str())];
            t.extend(m.origin.as_deref().map(|o| ("origin", o)));
            t.extend(
                m.properties
                    .iter()
                    .flat_map(|(k, v)| [("properties", k.as_str()), ("properties", v.as_str())]),
            );
            t
        }
        RecordBody::Log(l) => {
            let mut t = vec![
                ("host", l.host.as_str()),
                ("app", l.app.as_str()),
                ("text", l.text.as_str()),
                ("proc_id", l.proc_id.as_str()),
                ("msg_id", l.msg_id.as_str()),
            ];
            t.extend(l.parse_error.as_deref().map(|p| ("parse_error", p)));
            for e in &l.structured_data {
                t.push(("structured_data", &e.id));
                t.extend(e.params.iter().flat_map(|(k, v)| {
                    [
                        ("structured_data", k.as_str()),
                        ("structured_data", v.as_str()),
                    ]
                }));
            }
            t
        }
        RecordBody::Bytes(_) => Vec::new(),
        RecordBody::File(f) => {
            return Some(format!(
                "a file part ({}) has no table in PostgreSQL; route files to a `files` sink \
                 (give this sink `kinds` without \"file\")",
                f.path
            ))
        }
    };
    texts.iter().find(|(_, s)| s.contains('\0')).map(|(col, _)| {
        format!("column {col}: the text holds a NUL character, which PostgreSQL text and jsonb cannot store")
    })
}

impl AsyncSink for PostgresSink {
    async fn write(&mut self, records: &[&Delivered]) -> Result<usize, SinkError> {
        let take = match records.iter().position(|r| unstorable(r).is_some()) {
            Some(0) => {
                let reason = unstorable(records[0]).unwrap_or_default();
                return Err(SinkError::Reject { at: 0, reason });
            }
            Some(n) => n,
            None => records.len(),
        };
        let records = &records[..take];
        let mut client = match self.client.take() {
            Some(c) if !c.is_closed() => c,
            _ => self.connect().await?,
        };
        let mut fresh: Vec<(&Delivered, Arc<Dest>)> = Vec::with_capacity(records.len());
        for r in records {
            let dest = self.destination(&mut client, r).await?;
            if !self.is_stored(r) {
                fresh.push((r, dest));
            }
        }
        if !fresh.is_empty() {
            self.commit(&mut client, &fresh).await?;
            let fresh: Vec<&Delivered> = fresh.iter().map(|(r, _)| *r).collect();
            for p in positions_by_epoch(&fresh) {
                self.remember(p.stream, p.epoch, p.seq);
            }
        }
        self.client = Some(client);
        Ok(take)
    }

    /// The positions the cursor table holds: delivery drops replays at or
    /// below them before they reach `write`.
    async fn stored_positions(&mut self) -> Result<Option<Vec<Position>>> {
        let client = self
            .connect()
            .await
            .context("reading the stored positions")?;
        self.client = Some(client);
        // The newest epoch per stream is the one delivery compares with;
        // older epochs are still checked here, in `write`.
        Ok(Some(
            self.stored
                .iter()
                .filter_map(|(stream, epochs)| {
                    epochs.last().map(|(epoch, seq)| Position {
                        stream: stream.clone(),
                        epoch: *epoch,
                        seq: *seq,
                    })
                })
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        toml::from_str(&format!(
            "url = \"postgres://postgres@127.0.0.1/test\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn table_names_and_urls_are_checked_naming_the_key() {
        assert!(cfg("").validate().is_ok());
        let err = cfg("points_table = \"weir points\"")
            .validate()
            .unwrap_err();
        assert!(err.starts_with("points_table: `weir points`"), "{err}");
        assert!(cfg("logs_table = \"plant.logs\"").validate().is_ok());
        let err = cfg("logs_table = \"weir_points\"").validate().unwrap_err();
        assert!(err.contains("must differ"), "{err}");
        let bad: Config = toml::from_str("url = \"mysql://x\"").unwrap();
        let err = bad.validate().unwrap_err();
        assert!(err.starts_with("url: "), "{err}");
        let tls: Config = toml::from_str("url = \"postgres://u@h/db?sslmode=require\"").unwrap();
        assert_eq!(tls.tls().unwrap().mode, SslMode::Require);
        assert!(tls.validate().is_ok());
        assert_eq!(
            redact("postgres://weir:secret@db/plant"),
            "postgres://weir:***@db/plant"
        );
    }

    #[test]
    fn table_templates_are_checked_naming_the_key() {
        assert!(
            cfg("points_table = \"weir_{stream}\"").validate().is_ok(),
            "a fixed name a template could make is settled per name at run"
        );
        let all = cfg(
            "points_table = \"plant.weir_{stream}_{tag}\"\nmessages_table = \"mqtt_{topic}\"\n\
             logs_table = \"log_{stream}\"\nbytes_table = \"bytes_{stream}\"",
        );
        assert!(all.validate().is_ok());
        assert!(
            matches!(&all.specs().unwrap()[0], TableSpec::Template { schema: Some(s), .. } if s == "plant")
        );
        for (extra, want) in [
            ("messages_table = \"weir_{tag}\"", "messages_table: `{tag}` in `weir_{tag}` has no value for this kind; use {stream} or {topic}"),
            ("logs_table = \"log_{topic}\"", "logs_table: `{topic}` in `log_{topic}` has no value for this kind; use {stream}"),
            ("bytes_table = \"b-{stream}\"", "bytes_table: `b-{stream}` has `-` outside a placeholder"),
            ("points_table = \"{stream}.t\"", "points_table: `{stream}.t` has a placeholder in its schema part"),
            (
                "points_table = \"w_{stream}\"\nlogs_table = \"w_{stream}_logs\"",
                "logs_table: `w_{stream}_logs` and points_table `w_{stream}` could make the same table name",
            ),
            ("cursor_table = \"c_{stream}\"", "cursor_table: `c_{stream}` must be a table name"),
        ] {
            let err = cfg(extra).validate().unwrap_err();
            assert!(err.starts_with(want), "{extra}: {err}");
        }
    }

    #[test]
    fn a_templated_table_is_quoted_with_its_schema_in_its_ddl() {
        let d = Dest::templated(Some("plant".into()), "weir_plant_a".into());
        assert_eq!(d.sql, "\"plant\".\"weir_plant_a\"");
        let ddl = Table::Logs.ddl_named(&d.sql, "\"weir_plant_a_stream_epoch_seq\"");
        assert!(
            ddl.starts_with(
                "CREATE TABLE IF NOT EXISTS \"plant\".\"weir_plant_a\" (stream text NOT NULL,"
            ),
            "{ddl}"
        );
        assert!(ddl.ends_with("CREATE INDEX IF NOT EXISTS \"weir_plant_a_stream_epoch_seq\" ON \"plant\".\"weir_plant_a\" (stream, epoch, seq)"), "{ddl}");
        assert_eq!(
            Table::Points.ddl("weir_points"),
            Table::Points.ddl_named("weir_points", "weir_points_stream_epoch_seq")
        );
    }

    #[test]
    fn tls_keys_are_checked_against_sslmode_naming_the_key() {
        assert_eq!(
            cfg("").tls().unwrap().mode,
            SslMode::Prefer,
            "libpq's default"
        );
        let full = cfg("sslmode = \"verify-full\"").tls().unwrap();
        assert_eq!(
            full.ca.as_deref(),
            Some(std::path::Path::new(tls::SYSTEM_CA_FILE)),
            "verify-* without tls_ca_file trusts the system roots"
        );
        assert_eq!(cfg("sslmode = \"require\"").tls().unwrap().ca, None);
        for (extra, want) in [
            ("sslmode = \"verify\"", "sslmode: `verify`"),
            (
                "sslmode = \"disable\"\ntls_ca_file = \"/etc/ssl/certs/ssl-cert-snakeoil.pem\"",
                "tls_ca_file: is set but sslmode is `disable`",
            ),
            (
                "tls_ca_file = \"/etc/ssl/certs/ssl-cert-snakeoil.pem\"",
                "tls_ca_file: sslmode `prefer` never checks",
            ),
            (
                "sslmode = \"verify-ca\"\ntls_server_name = \"db\"",
                "tls_server_name: only sslmode `verify-full`",
            ),
            (
                "sslmode = \"require\"\ntls_cert_file = \"/x.pem\"",
                "tls_cert_file and tls_key_file: set both",
            ),
            (
                "sslmode = \"verify-full\"\ntls_ca_file = \"/nonexistent/ca.pem\"",
                "tls_ca_file: cannot read /nonexistent/ca.pem",
            ),
        ] {
            let err = cfg(extra).validate().unwrap_err();
            assert!(err.starts_with(want), "{extra}: {err}");
        }
        let both: Config = toml::from_str(
            "url = \"postgres://u@h/db?sslmode=require\"\nsslmode = \"verify-full\"",
        )
        .unwrap();
        assert!(both
            .validate()
            .unwrap_err()
            .starts_with("sslmode: is set in `url` too"));
        let in_url: Config =
            toml::from_str("url = \"postgres://u@h/db?sslmode=verify-full\"").unwrap();
        assert!(in_url
            .validate()
            .unwrap_err()
            .contains("this sink's `sslmode` key"));
    }

    #[test]
    fn the_ddl_has_the_columns_the_copy_writes() {
        let ddl = Table::Points.ddl("weir_points");
        assert!(ddl.starts_with("CREATE TABLE IF NOT EXISTS weir_points (stream text NOT NULL, epoch bigint NOT NULL, seq bigint NOT NULL, ts timestamptz NOT NULL, tag text NOT NULL, value double precision, value_int bigint"), "{ddl}");
        assert!(Table::Bytes
            .ddl("s.b")
            .contains("INDEX IF NOT EXISTS b_stream_epoch_seq ON s.b"));
    }

    #[test]
    fn positions_keep_each_epoch_of_a_stream_that_a_batch_crosses() {
        let rec = |epoch: u64, seq: u64, resent: bool| Delivered {
            stream: "s".into(),
            source_type: "t".into(),
            session: 1,
            epoch,
            seq,
            resent,
            body: RecordBody::Bytes(weir_protocol::Chunk {
                data: vec![],
                end: false,
            }),
        };
        let recs = [
            rec(7, 100, false),
            rec(7, 101, false),
            rec(7, 3, true),
            rec(9, 0, false),
            rec(9, 1, false),
        ];
        let refs: Vec<&Delivered> = recs.iter().collect();
        let got: Vec<(u64, u64)> = positions_by_epoch(&refs)
            .iter()
            .map(|p| (p.epoch, p.seq))
            .collect();
        assert_eq!(got, [(7, 101), (9, 1)]);
    }

    #[test]
    fn a_nul_in_text_is_unstorable_and_named_by_column() {
        let r = Delivered {
            stream: "s".into(),
            source_type: "t".into(),
            session: 1,
            epoch: 1,
            seq: 1,
            resent: false,
            body: RecordBody::Message(weir_protocol::Message::new("a\0b", vec![0], 0)),
        };
        assert!(unstorable(&r).unwrap().starts_with("column topic:"));
        let ok = Delivered {
            body: RecordBody::Message(weir_protocol::Message::new("ab", vec![0], 0)),
            ..r
        };
        assert_eq!(unstorable(&ok), None, "a NUL in bytea is fine");
    }
}
