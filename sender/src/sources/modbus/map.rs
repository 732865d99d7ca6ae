//! The register map: which requests read it (the planner) and how the bits
//! and words that come back become values. Pure (no I/O), unit-tested here.

use serde::{Deserialize, Serialize};
use weir_protocol::Value;

/// The four Modbus data tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read/write bits (function 1).
    Coil,
    /// Read-only bits (function 2).
    Discrete,
    /// Read/write 16-bit registers (function 3).
    Holding,
    /// Read-only 16-bit registers (function 4).
    Input,
}

impl Kind {
    /// The most one request may read: 2000 bits or 125 registers (Modbus
    /// Application Protocol v1.1b3, 6.1 to 6.4; a longer answer would not
    /// fit the 253-byte PDU).
    pub fn max_per_request(self) -> u16 {
        if self.is_bits() {
            2000
        } else {
            125
        }
    }

    pub fn is_bits(self) -> bool {
        matches!(self, Kind::Coil | Kind::Discrete)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Coil => "coil",
            Kind::Discrete => "discrete",
            Kind::Holding => "holding",
            Kind::Input => "input",
        }
    }
}

/// How a value is laid out in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    F32,
    F64,
    String,
}

impl ValueType {
    /// Registers one value takes (`string`: as many as `count` says).
    fn words(self) -> Option<u16> {
        match self {
            ValueType::Bool | ValueType::U16 | ValueType::I16 => Some(1),
            ValueType::U32 | ValueType::I32 | ValueType::F32 => Some(2),
            ValueType::F64 => Some(4),
            ValueType::String => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ValueType::Bool => "bool",
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::F32 => "f32",
            ValueType::F64 => "f64",
            ValueType::String => "string",
        }
    }
}

/// Which part comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Most significant first (Modbus's own order for the bytes of a register).
    Big,
    /// Least significant first.
    Little,
}

/// One `[[sources.registers]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// The points' tag (`tag[0]`, `tag[1]`, ... when `count` reads several values).
    pub tag: String,
    pub kind: Kind,
    /// The first register or bit, 0-based as on the wire (the register
    /// documented as 40001 is holding address 0).
    pub address: u16,
    /// `string`: the registers it spans (two characters each). Other types:
    /// how many values of the type follow each other (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u16>,
    /// Default `bool` for coils and discrete inputs, `u16` for registers.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub value_type: Option<ValueType>,
    /// 32- and 64-bit types: `big` (default: the first register holds the
    /// most significant word) or `little`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub word_order: Option<Order>,
    /// Register types: `big` (default, as Modbus sends them) or `little`
    /// (the two bytes of every register swapped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byte_order: Option<Order>,
    /// Numbers: value = raw × scale + offset (then a float).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<f64>,
}

impl Register {
    pub fn value_type(&self) -> ValueType {
        self.value_type.unwrap_or(if self.kind.is_bits() {
            ValueType::Bool
        } else {
            ValueType::U16
        })
    }

    /// How many values (points per poll) this entry gives.
    pub fn values(&self) -> u16 {
        match self.value_type() {
            ValueType::String => 1,
            _ => self.count.unwrap_or(1),
        }
    }

    /// Bits or registers one value takes.
    fn width(&self) -> u16 {
        if self.kind.is_bits() {
            return 1;
        }
        self.value_type()
            .words()
            .unwrap_or_else(|| self.count.unwrap_or(0))
    }

    /// Bits or registers the entry takes in all.
    pub fn span(&self) -> u32 {
        u32::from(self.width()) * u32::from(self.values())
    }

    /// The tag of value `i` of this entry.
    pub fn tag_of(&self, i: u16) -> String {
        if self.values() == 1 {
            self.tag.clone()
        } else {
            format!("{}[{i}]", self.tag)
        }
    }

    /// Checks the entry; the error starts with the key to fix.
    pub fn check(&self) -> Result<(), String> {
        if self.tag.is_empty() || self.tag.len() > 200 {
            return Err("tag: must be 1 to 200 characters".into());
        }
        let t = self.value_type();
        let kind = self.kind.name();
        if self.kind.is_bits() && t != ValueType::Bool {
            return Err(format!(
                "type: `{}` cannot be read from a {kind} (one bit each); use `bool`, or kind `holding`/`input`",
                t.name()
            ));
        }
        let numeric = !matches!(t, ValueType::Bool | ValueType::String);
        if !numeric && (self.scale.is_some() || self.offset.is_some()) {
            return Err(format!(
                "scale/offset: apply to numbers, not to type `{}`",
                t.name()
            ));
        }
        for (key, v) in [("scale", self.scale), ("offset", self.offset)] {
            if v.is_some_and(|v| !v.is_finite()) {
                return Err(format!("{key}: must be a finite number"));
            }
        }
        if self.word_order.is_some() && !matches!(t.words(), Some(2..)) {
            return Err(format!(
                "word_order: applies to u32, i32, f32 and f64, not to `{}`",
                t.name()
            ));
        }
        if self.byte_order.is_some() && self.kind.is_bits() {
            return Err(format!("byte_order: does not apply to a {kind}"));
        }
        let max = self.kind.max_per_request();
        match (t, self.count) {
            (ValueType::String, None) => {
                return Err(
                    "count: a string needs the number of registers it spans (two characters each)"
                        .into(),
                )
            }
            (_, Some(0)) => return Err("count: must be at least 1".into()),
            _ => {}
        }
        if self.span() > u32::from(max) {
            return Err(format!(
                "count: spans {} {}s; one request reads at most {max}",
                self.span(),
                if self.kind.is_bits() {
                    "bit"
                } else {
                    "register"
                }
            ));
        }
        if u32::from(self.address) + self.span() > 65536 {
            return Err(format!(
                "address: {} + {} runs past the last address 65535",
                self.address,
                self.span()
            ));
        }
        Ok(())
    }

    /// The values of this entry in an answer to a read of `start..`, which
    /// the caller checked covers the entry.
    pub fn decode(&self, start: u16, answer: &Answer) -> Vec<(String, Value)> {
        let at = usize::from(self.address - start);
        let width = usize::from(self.width());
        (0..self.values())
            .map(|i| {
                let from = at + usize::from(i) * width;
                let value = match answer {
                    Answer::Bits(bits) => Value::Bool(bits[from]),
                    Answer::Words(words) => self.decode_words(&words[from..from + width]),
                };
                (self.tag_of(i), value)
            })
            .collect()
    }

    fn decode_words(&self, raw: &[u16]) -> Value {
        let mut words: Vec<u16> = raw
            .iter()
            .map(|w| match self.byte_order {
                Some(Order::Little) => w.swap_bytes(),
                _ => *w,
            })
            .collect();
        let t = self.value_type();
        if t == ValueType::String {
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
            let text = String::from_utf8_lossy(&bytes);
            return Value::Str(text.trim_end_matches(['\0', ' ']).to_string());
        }
        if self.word_order == Some(Order::Little) {
            words.reverse();
        }
        let wide = words
            .iter()
            .fold(0u64, |acc, w| (acc << 16) | u64::from(*w));
        let number = match t {
            ValueType::Bool => return Value::Bool(wide != 0),
            ValueType::U16 | ValueType::U32 => Number::Int(wide as i64),
            ValueType::I16 => Number::Int(i64::from(wide as u16 as i16)),
            ValueType::I32 => Number::Int(i64::from(wide as u32 as i32)),
            ValueType::F32 => Number::Float(f64::from(f32::from_bits(wide as u32))),
            ValueType::F64 => Number::Float(f64::from_bits(wide)),
            ValueType::String => unreachable!("handled above"),
        };
        match (number, self.scale, self.offset) {
            (Number::Int(i), None, None) => Value::I64(i),
            (Number::Int(i), scale, offset) => {
                Value::F64(i as f64 * scale.unwrap_or(1.0) + offset.unwrap_or(0.0))
            }
            (Number::Float(f), scale, offset) => {
                Value::F64(f * scale.unwrap_or(1.0) + offset.unwrap_or(0.0))
            }
        }
    }
}

enum Number {
    Int(i64),
    Float(f64),
}

/// What a read returned: bits (coils, discrete inputs) or registers.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Bits(Vec<bool>),
    Words(Vec<u16>),
}

impl Answer {
    pub fn len(&self) -> usize {
        match self {
            Answer::Bits(b) => b.len(),
            Answer::Words(w) => w.len(),
        }
    }
}

/// One read request and the register entries it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    pub address: u16,
    pub count: u16,
    /// Indexes into the register map.
    pub items: Vec<usize>,
}

/// The fewest requests that read every entry: per table, entries sorted by
/// address, and adjacent or overlapping ones joined while the request
/// stays within the protocol's limit. Entries with addresses in between
/// are not joined: a device may refuse to read an address it does not
/// have, and that would fail the whole request.
pub fn plan(registers: &[Register]) -> Vec<Request> {
    let mut order: Vec<usize> = (0..registers.len()).collect();
    order.sort_by_key(|&i| (registers[i].kind, registers[i].address, registers[i].span()));
    let mut requests: Vec<Request> = Vec::new();
    for i in order {
        let r = &registers[i];
        let (start, end) = (u32::from(r.address), u32::from(r.address) + r.span());
        if let Some(last) = requests.last_mut() {
            let last_end = u32::from(last.address) + u32::from(last.count);
            let joined_end = last_end.max(end);
            if last.kind == r.kind
                && start <= last_end
                && joined_end - u32::from(last.address) <= u32::from(r.kind.max_per_request())
            {
                last.count = (joined_end - u32::from(last.address)) as u16;
                last.items.push(i);
                continue;
            }
        }
        requests.push(Request {
            kind: r.kind,
            address: r.address,
            count: r.span() as u16,
            items: vec![i],
        });
    }
    requests
}

/// Replaces request `index` by one request per entry: after a device
/// refused the joined read (illegal data address), so the entries it has
/// are still read.
pub fn split(plan: &mut Vec<Request>, index: usize, registers: &[Register]) {
    let joined = plan.remove(index);
    for (n, i) in joined.items.into_iter().enumerate() {
        let r = &registers[i];
        plan.insert(
            index + n,
            Request {
                kind: r.kind,
                address: r.address,
                count: r.span() as u16,
                items: vec![i],
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(tag: &str, kind: Kind, address: u16, t: ValueType, count: Option<u16>) -> Register {
        Register {
            tag: tag.into(),
            kind,
            address,
            count,
            value_type: Some(t),
            word_order: None,
            byte_order: None,
            scale: None,
            offset: None,
        }
    }

    #[test]
    fn adjacent_registers_share_a_request_and_gaps_or_other_tables_do_not() {
        use ValueType::*;
        let map = vec![
            reg("b", Kind::Holding, 2, F32, None),    // 2..4
            reg("a", Kind::Holding, 0, U16, None),    // 0
            reg("c", Kind::Holding, 1, U16, None),    // 1: joins 0 and 2
            reg("gap", Kind::Holding, 10, U16, None), // not adjacent
            reg("in", Kind::Input, 4, U32, None),     // other table
            reg("over", Kind::Holding, 3, U16, None), // overlaps b
            reg("c0", Kind::Coil, 0, Bool, None),
            reg("c1", Kind::Coil, 1, Bool, Some(3)),
            reg("d0", Kind::Discrete, 1, Bool, None),
        ];
        let p = plan(&map);
        let got: Vec<(Kind, u16, u16, Vec<usize>)> = p
            .into_iter()
            .map(|r| (r.kind, r.address, r.count, r.items))
            .collect();
        assert_eq!(
            got,
            vec![
                (Kind::Coil, 0, 4, vec![6, 7]),
                (Kind::Discrete, 1, 1, vec![8]),
                (Kind::Holding, 0, 4, vec![1, 2, 0, 5]),
                (Kind::Holding, 10, 1, vec![3]),
                (Kind::Input, 4, 2, vec![4]),
            ]
        );
    }

    #[test]
    fn a_request_never_exceeds_125_registers_or_2000_bits() {
        // 300 adjacent u16 registers: 125 + 125 + 50.
        let map: Vec<Register> = (0..300)
            .map(|a| reg(&format!("h{a}"), Kind::Holding, a, ValueType::U16, None))
            .collect();
        let counts: Vec<(u16, u16)> = plan(&map).iter().map(|r| (r.address, r.count)).collect();
        assert_eq!(counts, vec![(0, 125), (125, 125), (250, 50)]);
        // f32s (two registers each) never straddle the limit: 62 per request.
        let map: Vec<Register> = (0..100)
            .map(|i| reg(&format!("f{i}"), Kind::Input, i * 2, ValueType::F32, None))
            .collect();
        let counts: Vec<u16> = plan(&map).iter().map(|r| r.count).collect();
        assert_eq!(counts, vec![124, 76]);
        // 4500 coils in blocks of 500: 2000 + 2000 + 500.
        let map: Vec<Register> = (0..9)
            .map(|i| {
                reg(
                    &format!("c{i}"),
                    Kind::Coil,
                    i * 500,
                    ValueType::Bool,
                    Some(500),
                )
            })
            .collect();
        let counts: Vec<(u16, u16)> = plan(&map).iter().map(|r| (r.address, r.count)).collect();
        assert_eq!(counts, vec![(0, 2000), (2000, 2000), (4000, 500)]);
        // Every entry is in exactly one request that covers it.
        for r in plan(&map) {
            assert!(r.count <= Kind::Coil.max_per_request());
            for i in r.items {
                let m = &map[i];
                assert!(m.address >= r.address);
                assert!(
                    u32::from(m.address) + m.span() <= u32::from(r.address) + u32::from(r.count)
                );
            }
        }
    }

    #[test]
    fn a_refused_joined_request_splits_into_one_request_per_entry() {
        let map = vec![
            reg("a", Kind::Holding, 0, ValueType::U16, None),
            reg("b", Kind::Holding, 1, ValueType::F32, None),
            reg("i", Kind::Input, 0, ValueType::U16, None),
        ];
        let mut p = plan(&map);
        assert_eq!(p.len(), 2);
        split(&mut p, 0, &map);
        let got: Vec<(u16, u16, Vec<usize>)> = p
            .iter()
            .map(|r| (r.address, r.count, r.items.clone()))
            .collect();
        assert_eq!(got, vec![(0, 1, vec![0]), (1, 2, vec![1]), (0, 1, vec![2])]);
    }

    fn decode(r: &Register, words: &[u16]) -> Value {
        r.decode(r.address, &Answer::Words(words.to_vec()))[0]
            .1
            .clone()
    }

    #[test]
    fn values_decode_in_every_word_and_byte_order() {
        let mut r = reg("x", Kind::Holding, 0, ValueType::F32, None);
        let bits = 1234.5f32.to_bits();
        let (hi, lo) = ((bits >> 16) as u16, bits as u16);
        assert_eq!(decode(&r, &[hi, lo]), Value::F64(1234.5));
        r.word_order = Some(Order::Little);
        assert_eq!(decode(&r, &[lo, hi]), Value::F64(1234.5));
        r.byte_order = Some(Order::Little);
        assert_eq!(
            decode(&r, &[lo.swap_bytes(), hi.swap_bytes()]),
            Value::F64(1234.5)
        );
        let mut r = reg("x", Kind::Input, 0, ValueType::F64, None);
        let b = (-0.125f64).to_bits();
        let w = [
            (b >> 48) as u16,
            (b >> 32) as u16,
            (b >> 16) as u16,
            b as u16,
        ];
        assert_eq!(decode(&r, &w), Value::F64(-0.125));
        r.word_order = Some(Order::Little);
        assert_eq!(decode(&r, &[w[3], w[2], w[1], w[0]]), Value::F64(-0.125));
        let r = reg("x", Kind::Holding, 0, ValueType::I16, None);
        assert_eq!(decode(&r, &[0xFFFE]), Value::I64(-2));
        let r = reg("x", Kind::Holding, 0, ValueType::U16, None);
        assert_eq!(decode(&r, &[0xFFFE]), Value::I64(65534));
        let r = reg("x", Kind::Holding, 0, ValueType::I32, None);
        assert_eq!(decode(&r, &[0xFFFF, 0xFF00]), Value::I64(-256));
        let mut r = reg("x", Kind::Holding, 0, ValueType::U32, None);
        assert_eq!(decode(&r, &[0x0001, 0x0000]), Value::I64(65536));
        r.byte_order = Some(Order::Little);
        assert_eq!(decode(&r, &[0x0100, 0x0000]), Value::I64(65536));
        let r = reg("x", Kind::Holding, 0, ValueType::Bool, None);
        assert_eq!(decode(&r, &[0x0100]), Value::Bool(true));
        assert_eq!(decode(&r, &[0]), Value::Bool(false));
    }

    #[test]
    fn scale_and_offset_make_a_float_and_strings_drop_their_padding() {
        let mut r = reg("x", Kind::Input, 0, ValueType::I16, None);
        r.scale = Some(0.1);
        r.offset = Some(-40.0);
        let Value::F64(v) = decode(&r, &[(-25i16) as u16]) else {
            panic!("not a float")
        };
        assert!((v - (-42.5)).abs() < 1e-9, "{v}");
        let mut r = reg("s", Kind::Holding, 0, ValueType::String, Some(4));
        let w = [
            u16::from_be_bytes(*b"PU"),
            u16::from_be_bytes(*b"MP"),
            u16::from_be_bytes(*b"1\0"),
            0,
        ];
        assert_eq!(decode(&r, &w), Value::Str("PUMP1".into()));
        r.byte_order = Some(Order::Little);
        let swapped: Vec<u16> = w.iter().map(|x| x.swap_bytes()).collect();
        assert_eq!(decode(&r, &swapped), Value::Str("PUMP1".into()));
    }

    #[test]
    fn a_count_reads_values_in_a_row_tagged_by_index() {
        let r = reg("t", Kind::Holding, 10, ValueType::I16, Some(3));
        let got = r.decode(8, &Answer::Words(vec![9, 9, 1, 0xFFFF, 3]));
        assert_eq!(
            got,
            vec![
                ("t[0]".to_string(), Value::I64(1)),
                ("t[1]".to_string(), Value::I64(-1)),
                ("t[2]".to_string(), Value::I64(3)),
            ]
        );
        let c = reg("c", Kind::Coil, 1, ValueType::Bool, Some(2));
        let got = c.decode(0, &Answer::Bits(vec![false, true, false]));
        assert_eq!(got[0], ("c[0]".to_string(), Value::Bool(true)));
        assert_eq!(got[1], ("c[1]".to_string(), Value::Bool(false)));
    }

    #[test]
    fn entries_that_cannot_be_read_as_written_are_refused_naming_the_key() {
        use ValueType::*;
        let err = |r: Register| r.check().unwrap_err();
        assert!(err(reg("x", Kind::Coil, 0, F32, None))
            .starts_with("type: `f32` cannot be read from a coil"));
        assert!(err(reg("x", Kind::Holding, 0, String, None)).starts_with("count: a string needs"));
        assert!(err(reg("x", Kind::Holding, 0, U16, Some(126)))
            .starts_with("count: spans 126 registers"));
        assert!(reg("x", Kind::Coil, 0, Bool, Some(2000)).check().is_ok());
        assert!(err(reg("x", Kind::Holding, 65535, U32, None)).starts_with("address: 65535 + 2"));
        let mut r = reg("x", Kind::Holding, 0, U16, None);
        r.word_order = Some(Order::Little);
        assert!(err(r).starts_with("word_order:"));
        let mut r = reg("x", Kind::Holding, 0, Bool, None);
        r.scale = Some(2.0);
        assert!(err(r).starts_with("scale/offset:"));
        let mut r = reg("x", Kind::Discrete, 0, Bool, None);
        r.byte_order = Some(Order::Big);
        assert!(err(r).starts_with("byte_order:"));
        assert!(err(reg("", Kind::Holding, 0, U16, None)).starts_with("tag:"));
    }
}
