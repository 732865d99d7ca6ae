//! Table names from templates: `points_table = "weir_{stream}"`.
//!
//! A record table key (`points_table`, `messages_table`, `logs_table`,
//! `bytes_table`) is either a plain name, used as written (as before
//! templates), or a template with `{stream}` (and `{tag}` for points,
//! `{topic}` for messages) in its table part; a `schema.` before it is
//! kept as written. The expansion becomes a PostgreSQL identifier by
//! [`clean`] or [`hashed`] (the rule is in docs/sinks.md) and is always
//! quoted. Which of the two a stream gets is decided once, in the
//! database, by the sink (see `PostgresSink::resolve`), so it never
//! changes across restarts.

use crate::sinks::dest_template::Template;

/// PostgreSQL's longest identifier in bytes (NAMEDATALEN - 1); longer
/// names would be cut by the server, silently.
pub const MAX_IDENT: usize = 63;

/// The bytes of the mapped name a hashed name keeps: room for `_` and
/// eight hex digits within [`MAX_IDENT`].
pub const HASHED_KEEP: usize = MAX_IDENT - 9;

/// FNV-1a, 32 bits: small, and stable across releases and platforms (a
/// name must not change when weir is upgraded).
fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// `raw` lowercased, each character outside `[a-z0-9_]` (after
/// lowercasing ASCII letters) replaced by one `_`.
pub fn map_ident(raw: &str) -> String {
    raw.chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect()
}

/// The mapped name when it is a usable identifier (1 to 63 bytes).
pub fn clean(raw: &str) -> Option<String> {
    let m = map_ident(raw);
    (!m.is_empty() && m.len() <= MAX_IDENT).then_some(m)
}

/// The mapped name cut to [`HASHED_KEEP`] bytes, then `_` and the FNV-1a
/// hash of `raw`'s bytes as eight hex digits: at most 63 bytes, and two
/// raw names that differ give different names (but for a 1 in 2^32 hash
/// clash, which the sink detects).
pub fn hashed(raw: &str) -> String {
    let mut m = map_ident(raw);
    // ASCII only, so any byte length is a character boundary.
    m.truncate(HASHED_KEEP);
    format!("{m}_{:08x}", fnv1a32(raw.as_bytes()))
}

/// `ident` as a quoted identifier.
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The index a templated table gets: `<table>_stream_epoch_seq`, hashed
/// when longer than 63 bytes (so it never equals the table's own name).
pub fn index_name(table: &str) -> String {
    let n = format!("{table}_stream_epoch_seq");
    if n.len() <= MAX_IDENT {
        n
    } else {
        hashed(&n)
    }
}

/// `text` as a string literal whatever `standard_conforming_strings` is.
pub fn literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// A plain identifier: letters, digits, `_`, not starting with a digit,
/// at most 63 bytes (needs no quoting).
pub fn plain_ident(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= MAX_IDENT
        && !p.starts_with(|c: char| c.is_ascii_digit())
        && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// What a record table key says.
#[derive(Debug, Clone)]
pub enum TableSpec {
    /// `table` or `schema.table`, plain identifiers, used as written.
    Fixed(String),
    /// A table part with placeholders, in a fixed schema or none.
    Template {
        schema: Option<String>,
        table: Template,
        /// The table part as written, for messages.
        text: String,
    },
}

impl TableSpec {
    /// Reads a record table key. `placeholders` are the ones this kind
    /// has values for; the error names `key`.
    pub fn parse(key: &str, text: &str, placeholders: &[&str]) -> Result<TableSpec, String> {
        if !text.contains(['{', '}']) {
            return Ok(TableSpec::Fixed(text.to_string()));
        }
        let allowed = placeholders
            .iter()
            .map(|p| format!("{{{p}}}"))
            .collect::<Vec<_>>()
            .join(" or ");
        let (schema, table) = match text.split_once('.') {
            Some((s, t)) if !s.contains(['{', '}']) => (Some(s), t),
            Some((s, _)) => {
                return Err(format!(
                    "{key}: `{text}` has a placeholder in its schema part `{s}`; the schema is a plain name, placeholders go in the table part (e.g. \"plant.weir_{{stream}}\")"
                ))
            }
            None => (None, text),
        };
        if let Some(s) = schema {
            if !plain_ident(s) {
                return Err(format!(
                    "{key}: the schema `{s}` in `{text}` must be letters, digits and `_`, not starting with a digit"
                ));
            }
        }
        let tpl = Template::parse(table).map_err(|e| format!("{key}: {e}"))?;
        let mut rest = table;
        let mut fixed = String::new();
        while let Some(open) = rest.find('{') {
            fixed.push_str(&rest[..open]);
            // `Template::parse` checked that every `{` is closed.
            let close = open + rest[open..].find('}').unwrap_or(rest.len() - open);
            let name = &rest[open + 1..close];
            if !placeholders.contains(&name) {
                return Err(format!(
                    "{key}: `{{{name}}}` in `{text}` has no value for this kind; use {allowed}"
                ));
            }
            rest = &rest[(close + 1).min(rest.len())..];
        }
        fixed.push_str(rest);
        if let Some(c) = fixed
            .chars()
            .find(|c| !c.is_ascii_alphanumeric() && *c != '_')
        {
            return Err(format!(
                "{key}: `{text}` has `{c}` outside a placeholder; the fixed text of a table name is letters, digits and `_`"
            ));
        }
        let spec = TableSpec::Template {
            schema: schema.map(str::to_string),
            table: tpl,
            text: table.to_string(),
        };
        if spec.prefix().len() > HASHED_KEEP {
            return Err(format!(
                "{key}: `{text}` has more than {HASHED_KEEP} bytes before its first placeholder, so no name could keep any of the placeholder's value within PostgreSQL's 63; shorten it"
            ));
        }
        Ok(spec)
    }

    /// The lowercased text of the table part before its first placeholder.
    pub fn prefix(&self) -> String {
        match self {
            TableSpec::Fixed(t) => t.to_ascii_lowercase(),
            TableSpec::Template { table, .. } => table.prefix().to_ascii_lowercase(),
        }
    }

    /// The schema, lowercased (as PostgreSQL folds a plain name).
    pub fn schema(&self) -> Option<String> {
        match self {
            TableSpec::Fixed(t) => t.split_once('.').map(|(s, _)| s.to_ascii_lowercase()),
            TableSpec::Template { schema, .. } => schema.as_ref().map(|s| s.to_ascii_lowercase()),
        }
    }
}

/// True when two schemas may be the same one (no schema means the
/// search path, which may be either).
pub fn same_schema(a: &Option<String>, b: &Option<String>) -> bool {
    a.is_none() || b.is_none() || a == b
}

/// Refuses two templated keys that could make the same name: each one's
/// fixed text before its first placeholder must not start the other's
/// (names keep that text whole, hashed or not, so two names that differ
/// there never meet).
pub fn check_overlap(specs: &[(&str, &TableSpec)]) -> Result<(), String> {
    for (i, (key_a, a)) in specs.iter().enumerate() {
        for (key_b, b) in &specs[..i] {
            let (TableSpec::Template { text: ta, .. }, TableSpec::Template { text: tb, .. }) =
                (a, b)
            else {
                continue;
            };
            let (pa, pb) = (a.prefix(), b.prefix());
            if same_schema(&a.schema(), &b.schema()) && (pa.starts_with(&pb) || pb.starts_with(&pa))
            {
                return Err(format!(
                    "{key_a}: `{ta}` and {key_b} `{tb}` could make the same table name; start them with different text before the first placeholder (e.g. \"weir_points_{{stream}}\" and \"weir_logs_{{stream}}\")"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lowercased_with_every_other_character_an_underscore() {
        assert_eq!(map_ident("weir_plant/B-2"), "weir_plant_b_2");
        assert_eq!(map_ident("Zürich.Line 1"), "z_rich_line_1");
        assert_eq!(clean("weir_plant/a").as_deref(), Some("weir_plant_a"));
        assert_eq!(clean(""), None, "an empty name is hashed");
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's \\ x"), "E'it''s \\\\ x'");
    }

    #[test]
    fn a_name_past_63_bytes_is_cut_to_54_and_gets_a_stable_hash() {
        let raw = format!("weir_{}", "plant/".repeat(20));
        assert_eq!(clean(&raw), None);
        let h = hashed(&raw);
        assert_eq!(h.len(), MAX_IDENT);
        assert_eq!(&h[..HASHED_KEEP], &map_ident(&raw)[..HASHED_KEEP]);
        // The documented examples (docs/sinks.md): FNV-1a 32 of the raw bytes.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(hashed("weir_plant/a"), "weir_plant_a_064b3404");
        assert_eq!(hashed("weir_plant_a"), "weir_plant_a_25d31214");
        assert_ne!(hashed(&raw), hashed(&format!("{raw}x")));
        assert_eq!(index_name("weir_plant_a"), "weir_plant_a_stream_epoch_seq");
        let long = index_name(&h);
        assert_eq!(long.len(), MAX_IDENT);
        assert_ne!(long, h, "an index never takes its table's name");
    }

    #[test]
    fn a_template_keeps_its_schema_and_refuses_what_never_makes_a_name() {
        let points = ["stream", "tag"];
        let t = TableSpec::parse("points_table", "Plant.Weir_{stream}", &points).unwrap();
        assert_eq!(t.schema().as_deref(), Some("plant"));
        assert_eq!(t.prefix(), "weir_");
        assert!(matches!(
            TableSpec::parse("points_table", "weir_points", &points).unwrap(),
            TableSpec::Fixed(_)
        ));
        for (text, want) in [
            ("{stream}.t", "points_table: `{stream}.t` has a placeholder in its schema"),
            ("my schema.t_{stream}", "points_table: the schema `my schema`"),
            ("weir_{topic}", "points_table: `{topic}` in `weir_{topic}` has no value for this kind; use {stream} or {tag}"),
            ("weir-{stream}", "points_table: `weir-{stream}` has `-` outside"),
            ("s.t.{stream}", "points_table: `s.t.{stream}` has `.` outside"),
            ("weir_{stream", "points_table: `weir_{stream` has a `{` without"),
            ("weir_{nope}", "points_table: `{nope}` in `weir_{nope}` is not a placeholder"),
        ] {
            let err = TableSpec::parse("points_table", text, &points).unwrap_err();
            assert!(err.starts_with(want), "{text}: {err}");
        }
        let long = format!("{}_{{stream}}", "w".repeat(55));
        let err = TableSpec::parse("logs_table", &long, &["stream"]).unwrap_err();
        assert!(err.contains("more than 54 bytes"), "{err}");
    }

    #[test]
    fn two_templates_that_could_make_one_name_are_refused_naming_the_key() {
        let p = |k, t| TableSpec::parse(k, t, &["stream", "tag", "topic"]).unwrap();
        let a = p("points_table", "weir_{stream}");
        let b = p("messages_table", "weir_m_{stream}");
        let err = check_overlap(&[("points_table", &a), ("messages_table", &b)]).unwrap_err();
        assert!(err.starts_with("messages_table: `weir_m_{stream}` and points_table `weir_{stream}` could make the same table name"), "{err}");
        let c = p("messages_table", "msg_{stream}");
        assert!(check_overlap(&[("points_table", &a), ("messages_table", &c)]).is_ok());
        let d = p("messages_table", "other.weir_{stream}");
        let e = p("logs_table", "plant.weir_{stream}");
        assert!(
            check_overlap(&[("messages_table", &d), ("logs_table", &e)]).is_ok(),
            "different schemas never meet"
        );
        assert!(
            check_overlap(&[("points_table", &a), ("logs_table", &e)]).is_err(),
            "no schema may be any schema"
        );
        let f = p("logs_table", "WEIR_{stream}");
        assert!(check_overlap(&[("points_table", &a), ("logs_table", &f)]).is_err());
    }
}
