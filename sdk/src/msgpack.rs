//! The MessagePack subset plugins exchange with the node: a dynamic [`Value`], an encoder and a
//! decoder. Small on purpose, so the SDK has no dependencies.

use std::fmt;

/// Maximum nesting the decoder accepts (deeper input is an error, never a stack overflow).
pub const MAX_DEPTH: usize = 64;

/// A MessagePack value. Maps keep their order and may have non-string keys.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    /// Every integer that fits an `i64`.
    Int(i64),
    /// Integers above `i64::MAX`.
    UInt(u64),
    Float(f64),
    Str(String),
    Bin(Vec<u8>),
    Array(Vec<Value>),
    Map(Vec<(Value, Value)>),
}

impl Value {
    /// The member of a map with this string key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Follows a dotted path of map keys (`"card.country"`).
    pub fn path(&self, path: &str) -> Option<&Value> {
        let mut v = self;
        for part in path.split('.') {
            v = v.get(part)?;
        }
        Some(v)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// Integers, and floats with no fractional part that fit.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::UInt(u) => i64::try_from(*u).ok(),
            Value::Float(f) if f.fract() == 0.0 && *f >= i64::MIN as f64 && *f <= i64::MAX as f64 => Some(*f as i64),
            _ => None,
        }
    }

    /// Any number, as a float.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::UInt(u) => Some(*u as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    pub fn is_nil(&self) -> bool {
        matches!(self, Value::Nil)
    }

    /// A short text form for keys and messages: strings as they are, numbers and booleans
    /// printed, `None` for nil, arrays and maps.
    pub fn to_key(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.clone()),
            other => other.number_key(),
        }
    }

    /// Like [`to_key`](Value::to_key), but takes the string instead of copying it.
    pub fn into_key(self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s),
            other => other.number_key(),
        }
    }

    /// Numbers and booleans as text (numbers as `{}` writes them, without `core::fmt`).
    fn number_key(&self) -> Option<String> {
        let mut out = String::new();
        self.push_number_key(&mut out).then_some(out)
    }

    /// Appends what [`to_key`](Value::to_key) gives for a number or boolean; false for other
    /// values.
    pub(crate) fn push_number_key(&self, out: &mut String) -> bool {
        match self {
            Value::Int(i) => {
                if *i < 0 {
                    out.push('-');
                }
                crate::push_digits(out, i.unsigned_abs(), 1);
            }
            Value::UInt(u) => crate::push_digits(out, *u, 1),
            Value::Float(f) => crate::push_number(out, *f),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            _ => return false,
        }
        true
    }
}

impl Value {
    /// Builds a map from string keys.
    pub fn map<K: Into<String>>(entries: Vec<(K, Value)>) -> Value {
        Value::Map(entries.into_iter().map(|(k, v)| (Value::Str(k.into()), v)).collect())
    }

    /// The value as JSON text: maps become objects (keys as [`Value::to_key`] prints them),
    /// binary becomes an array of byte values, and non-finite floats become `null`.
    pub fn to_json(&self) -> String {
        let mut out = String::new();
        write_json(self, &mut out);
        out
    }
}

fn write_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_json(v: &Value, out: &mut String) {
    match v {
        Value::Nil => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(i) => out.push_str(&i.to_string()),
        Value::UInt(u) => out.push_str(&u.to_string()),
        Value::Float(f) if f.is_finite() => {
            let text = f.to_string();
            out.push_str(&text);
        }
        Value::Float(_) => out.push_str("null"),
        Value::Str(s) => write_json_str(s, out),
        Value::Bin(b) => {
            out.push('[');
            for (i, byte) in b.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&byte.to_string());
            }
            out.push(']');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(item, out);
            }
            out.push(']');
        }
        Value::Map(m) => {
            out.push('{');
            for (i, (k, item)) in m.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_str(&k.to_key().unwrap_or_default(), out);
                out.push(':');
                write_json(item, out);
            }
            out.push('}');
        }
    }
}

impl From<Vec<Value>> for Value {
    fn from(a: Vec<Value>) -> Value {
        Value::Array(a)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Str(s.to_string())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(s)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Value {
        Value::Int(i)
    }
}
impl From<u64> for Value {
    fn from(u: u64) -> Value {
        match i64::try_from(u) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::UInt(u),
        }
    }
}
impl From<f64> for Value {
    fn from(f: f64) -> Value {
        Value::Float(f)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

/// Why bytes are not a MessagePack value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ended inside a value.
    Truncated,
    /// A marker byte this codec does not read (extension types, 0xc1).
    Unsupported(u8),
    /// A string is not UTF-8.
    Utf8,
    /// Nesting deeper than [`MAX_DEPTH`].
    TooDeep,
    /// Bytes left over after the value.
    Trailing,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "input ends inside a value"),
            DecodeError::Unsupported(m) => write!(f, "unsupported MessagePack marker 0x{m:02x}"),
            DecodeError::Utf8 => write!(f, "string is not UTF-8"),
            DecodeError::TooDeep => write!(f, "nesting deeper than {MAX_DEPTH}"),
            DecodeError::Trailing => write!(f, "bytes left after the value"),
        }
    }
}

/// Decodes exactly one value from `bytes`.
pub fn decode(bytes: &[u8]) -> Result<Value, DecodeError> {
    let mut v = Value::Nil;
    decode_into(bytes, &mut v)?;
    Ok(v)
}

/// Decodes exactly one value from `bytes` into `slot`, reusing the strings, vectors and maps
/// `slot` already holds where the new value has the same shape (the plugin entry points decode
/// every event this way, so a steady stream of alike events allocates nothing). On error `slot`
/// holds a partial value.
pub fn decode_into(bytes: &[u8], slot: &mut Value) -> Result<(), DecodeError> {
    let mut r = Reader { buf: bytes, pos: 0 };
    r.value_into(0, slot)?;
    if r.pos != bytes.len() {
        return Err(DecodeError::Trailing);
    }
    Ok(())
}

/// Where the value starting at `bytes[0]` ends (its encoded length), without decoding it.
pub fn value_len(bytes: &[u8]) -> Result<usize, DecodeError> {
    let mut r = Reader { buf: bytes, pos: 0 };
    r.skip(0)?;
    Ok(r.pos)
}

pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) pos: usize,
}

/// The bytes as text. Event strings are almost always ASCII, which is checked inline here
/// (the general UTF-8 check is an out-of-line call that dominated decoding short strings).
#[inline]
/// The string `bytes` encodes (exactly one MessagePack str, nothing after it); `None` for
/// anything else.
pub(crate) fn as_encoded_str(bytes: &[u8]) -> Option<&str> {
    let (&first, rest) = bytes.split_first()?;
    let (len, body) = match first {
        0xa0..=0xbf => (usize::from(first & 0x1f), rest),
        0xd9 => (usize::from(*rest.first()?), rest.get(1..)?),
        0xda => (usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])), rest.get(2..)?),
        0xdb => {
            let n = u32::from_be_bytes([*rest.first()?, *rest.get(1)?, *rest.get(2)?, *rest.get(3)?]);
            (n as usize, rest.get(4..)?)
        }
        _ => return None,
    };
    if body.len() != len {
        return None;
    }
    utf8(body).ok()
}

fn utf8(b: &[u8]) -> Result<&str, DecodeError> {
    if b.is_ascii() {
        // SAFETY: ASCII bytes are valid UTF-8.
        Ok(unsafe { std::str::from_utf8_unchecked(b) })
    } else {
        std::str::from_utf8(b).map_err(|_| DecodeError::Utf8)
    }
}

fn set_str(slot: &mut Value, s: &str) {
    match slot {
        Value::Str(old) => {
            old.clear();
            old.push_str(s);
        }
        _ => *slot = Value::Str(s.to_string()),
    }
}

impl<'a> Reader<'a> {
    /// The header of the value at the cursor: its marker and, for strings, binaries, arrays
    /// and maps, its length.
    fn header(&mut self) -> Result<(u8, usize), DecodeError> {
        let m = self.u8()?;
        let n = match m {
            0x80..=0x9f => (m & 0x0f) as usize,
            0xa0..=0xbf => (m & 0x1f) as usize,
            0xc4..=0xc6 => self.len(1 << (m - 0xc4))?,
            0xd9..=0xdb => self.len(1 << (m - 0xd9))?,
            0xdc | 0xde => self.len(2)?,
            0xdd | 0xdf => self.len(4)?,
            _ => 0,
        };
        Ok((m, n))
    }

    /// Steps over one value.
    pub(crate) fn skip(&mut self, depth: usize) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let (m, n) = self.header()?;
        let fixed = match m {
            0x80..=0x8f | 0xde | 0xdf => {
                for _ in 0..n {
                    self.skip(depth + 1)?;
                    self.skip(depth + 1)?;
                }
                0
            }
            0x90..=0x9f | 0xdc | 0xdd => {
                for _ in 0..n {
                    self.skip(depth + 1)?;
                }
                0
            }
            0xa0..=0xbf | 0xc4..=0xc6 | 0xd9..=0xdb => n,
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => 0,
            0xca => 4,
            0xcb => 8,
            0xcc | 0xd0 => 1,
            0xcd | 0xd1 => 2,
            0xce | 0xd2 => 4,
            0xcf | 0xd3 => 8,
            other => return Err(DecodeError::Unsupported(other)),
        };
        self.take(fixed).map(|_| ())
    }

    /// Decodes one value into `slot`, reusing its allocations.
    pub(crate) fn value_into(&mut self, depth: usize, slot: &mut Value) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let m = match self.buf.get(self.pos) {
            Some(m) => *m,
            None => return Err(DecodeError::Truncated),
        };
        match m {
            0xa0..=0xbf | 0xd9..=0xdb => {
                let (_, n) = self.header()?;
                let b = self.take(n)?;
                let s = utf8(b)?;
                set_str(slot, s);
            }
            0x80..=0x8f | 0xde | 0xdf => {
                let (_, n) = self.header()?;
                if n > (self.buf.len() - self.pos) / 2 {
                    return Err(DecodeError::Truncated);
                }
                if !matches!(slot, Value::Map(_)) {
                    *slot = Value::Map(Vec::with_capacity(n));
                }
                if let Value::Map(entries) = slot {
                    entries.truncate(n);
                    for i in 0..n {
                        if i == entries.len() {
                            entries.push((Value::Nil, Value::Nil));
                        }
                        let (k, v) = &mut entries[i];
                        self.value_into(depth + 1, k)?;
                        self.value_into(depth + 1, v)?;
                    }
                }
            }
            0x90..=0x9f | 0xdc | 0xdd => {
                let (_, n) = self.header()?;
                if n > self.buf.len() - self.pos {
                    return Err(DecodeError::Truncated);
                }
                if !matches!(slot, Value::Array(_)) {
                    *slot = Value::Array(Vec::with_capacity(n));
                }
                if let Value::Array(items) = slot {
                    items.truncate(n);
                    for i in 0..n {
                        if i == items.len() {
                            items.push(Value::Nil);
                        }
                        self.value_into(depth + 1, &mut items[i])?;
                    }
                }
            }
            0xc4..=0xc6 => {
                let (_, n) = self.header()?;
                let b = self.take(n)?;
                match slot {
                    Value::Bin(old) => {
                        old.clear();
                        old.extend_from_slice(b);
                    }
                    _ => *slot = Value::Bin(b.to_vec()),
                }
            }
            _ => *slot = self.scalar()?,
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn len(&mut self, bytes: usize) -> Result<usize, DecodeError> {
        Ok(match bytes {
            1 => self.u8()? as usize,
            2 => u16::from_be_bytes(self.be()?) as usize,
            _ => u32::from_be_bytes(self.be()?) as usize,
        })
    }

    /// Reads a scalar (anything but strings, binaries, arrays and maps, which
    /// [`Reader::value_into`] reads).
    fn scalar(&mut self) -> Result<Value, DecodeError> {
        let m = self.u8()?;
        Ok(match m {
            0x00..=0x7f => Value::Int(m as i64),
            0xc0 => Value::Nil,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xca => Value::Float(f32::from_be_bytes(self.be()?) as f64),
            0xcb => Value::Float(f64::from_be_bytes(self.be()?)),
            0xcc => Value::Int(self.u8()? as i64),
            0xcd => Value::Int(u16::from_be_bytes(self.be()?) as i64),
            0xce => Value::Int(u32::from_be_bytes(self.be()?) as i64),
            0xcf => Value::from(u64::from_be_bytes(self.be()?)),
            0xd0 => Value::Int(self.u8()? as i8 as i64),
            0xd1 => Value::Int(i16::from_be_bytes(self.be()?) as i64),
            0xd2 => Value::Int(i32::from_be_bytes(self.be()?) as i64),
            0xd3 => Value::Int(i64::from_be_bytes(self.be()?)),
            0xe0..=0xff => Value::Int(m as i8 as i64),
            other => return Err(DecodeError::Unsupported(other)),
        })
    }
}

/// Encodes a value in the shortest form MessagePack allows.
pub fn encode(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Nil => out.push(0xc0),
        Value::Bool(false) => out.push(0xc2),
        Value::Bool(true) => out.push(0xc3),
        Value::Int(i) => encode_int(*i, out),
        Value::UInt(u) => match i64::try_from(*u) {
            Ok(i) => encode_int(i, out),
            Err(_) => {
                out.push(0xcf);
                out.extend_from_slice(&u.to_be_bytes());
            }
        },
        Value::Float(f) => {
            out.push(0xcb);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Str(s) => encode_str(s, out),
        Value::Bin(b) => {
            header(out, b.len(), None, [0xc4, 0xc5, 0xc6]);
            out.extend_from_slice(b);
        }
        Value::Array(a) => {
            header(out, a.len(), Some(0x90), [0xdc, 0xdc, 0xdd]);
            for x in a {
                encode(x, out);
            }
        }
        Value::Map(m) => {
            header(out, m.len(), Some(0x80), [0xde, 0xde, 0xdf]);
            for (k, x) in m {
                encode(k, out);
                encode(x, out);
            }
        }
    }
}

/// Writes the header of a map of `len` entries (its keys and values follow).
pub fn map_header(len: usize, out: &mut Vec<u8>) {
    header(out, len, Some(0x80), [0xde, 0xde, 0xdf]);
}

/// Encodes a string.
pub fn encode_str(s: &str, out: &mut Vec<u8>) {
    if s.len() < 32 {
        out.push(0xa0 | s.len() as u8);
    } else {
        header(out, s.len(), None, [0xd9, 0xda, 0xdb]);
    }
    out.extend_from_slice(s.as_bytes());
}

fn encode_int(i: i64, out: &mut Vec<u8>) {
    if (0..=0x7f).contains(&i) {
        out.push(i as u8);
    } else if (-32..0).contains(&i) {
        out.push(i as i8 as u8);
    } else if i >= 0 {
        if i <= u8::MAX as i64 {
            out.push(0xcc);
            out.push(i as u8);
        } else if i <= u16::MAX as i64 {
            out.push(0xcd);
            out.extend_from_slice(&(i as u16).to_be_bytes());
        } else if i <= u32::MAX as i64 {
            out.push(0xce);
            out.extend_from_slice(&(i as u32).to_be_bytes());
        } else {
            out.push(0xcf);
            out.extend_from_slice(&(i as u64).to_be_bytes());
        }
    } else if i >= i8::MIN as i64 {
        out.push(0xd0);
        out.push(i as i8 as u8);
    } else if i >= i16::MIN as i64 {
        out.push(0xd1);
        out.extend_from_slice(&(i as i16).to_be_bytes());
    } else if i >= i32::MIN as i64 {
        out.push(0xd2);
        out.extend_from_slice(&(i as i32).to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&i.to_be_bytes());
    }
}

/// Writes a length header: the fix form when `fix` is given and `len < 16`, else the 8-, 16- or
/// 32-bit form from `markers` (the 8-bit one is not used for arrays and maps, which have none).
fn header(out: &mut Vec<u8>, len: usize, fix: Option<u8>, markers: [u8; 3]) {
    match fix {
        Some(f) if len < 16 => out.push(f | len as u8),
        _ if fix.is_none() && len <= u8::MAX as usize => {
            out.push(markers[0]);
            out.push(len as u8);
        }
        _ if len <= u16::MAX as usize => {
            out.push(markers[1]);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(markers[2]);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(v: Value) {
        let mut b = Vec::new();
        encode(&v, &mut b);
        assert_eq!(decode(&b), Ok(v));
    }

    #[test]
    fn round_trips_every_kind_and_size() {
        for i in [0, 1, 127, 128, 255, 256, 65_535, 65_536, 4_294_967_295, 4_294_967_296, i64::MAX] {
            round(Value::Int(i));
            round(Value::Int(-i));
        }
        round(Value::Int(i64::MIN));
        round(Value::UInt(u64::MAX));
        round(Value::Float(-1.5));
        round(Value::Nil);
        round(Value::Bool(true));
        for n in [0, 31, 32, 255, 256, 70_000] {
            round(Value::Str("x".repeat(n)));
            round(Value::Bin(vec![7; n]));
            round(Value::Array(vec![Value::Int(1); n.min(20_000)]));
            round(Value::Map((0..n.min(20_000)).map(|i| (Value::Int(i as i64), Value::Nil)).collect()));
        }
    }

    #[test]
    fn encodes_the_shortest_forms() {
        let mut b = Vec::new();
        encode(&Value::Map(vec![(Value::from("a"), Value::Int(-1))]), &mut b);
        assert_eq!(b, [0x81, 0xa1, b'a', 0xff]);
    }

    #[test]
    fn rejects_bad_input_without_panicking() {
        assert_eq!(decode(&[0xdd, 0xff, 0xff, 0xff, 0xff]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0xa3, b'a']), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0xc1]), Err(DecodeError::Unsupported(0xc1)));
        assert_eq!(decode(&[0xa1, 0xff]), Err(DecodeError::Utf8));
        assert_eq!(decode(&[0xc0, 0xc0]), Err(DecodeError::Trailing));
        assert_eq!(decode(&[0x91; 100]), Err(DecodeError::TooDeep));
    }

    #[test]
    fn decoding_into_a_value_reuses_it_and_matches_decode() {
        let docs = [
            Value::map(vec![("a", Value::from("x")), ("b", Value::Array(vec![Value::Int(1), Value::from("y")]))]),
            Value::map(vec![("a", Value::from("longer text")), ("b", Value::Array(vec![]))]),
            Value::map(vec![("a", Value::Int(3)), ("c", Value::Bin(vec![1, 2])), ("d", Value::Nil)]),
            Value::from("not a map"),
            Value::map(vec![("a", Value::Map(vec![(Value::Int(1), Value::Float(2.5))]))]),
        ];
        let mut slot = Value::Nil;
        for d in &docs {
            let mut b = Vec::new();
            encode(d, &mut b);
            decode_into(&b, &mut slot).unwrap();
            assert_eq!(&slot, d);
            assert_eq!(value_len(&b), Ok(b.len()));
        }
        assert_eq!(decode_into(&[0xa3, b'a'], &mut slot), Err(DecodeError::Truncated));
        assert_eq!(decode_into(&[0x91; 100], &mut slot), Err(DecodeError::TooDeep));
        assert_eq!(decode_into(&[0xc0, 0xc0], &mut slot), Err(DecodeError::Trailing));
        assert_eq!(value_len(&[0xdd, 0xff, 0xff, 0xff, 0xff]), Err(DecodeError::Truncated));
        assert_eq!(value_len(&[0xc1]), Err(DecodeError::Unsupported(0xc1)));
    }

    #[test]
    fn paths_and_numbers() {
        let v = Value::Map(vec![(Value::from("card"), Value::Map(vec![(Value::from("n"), Value::Float(3.0))]))]);
        assert_eq!(v.path("card.n").and_then(Value::as_i64), Some(3));
        assert_eq!(v.path("card.n").and_then(Value::as_f64), Some(3.0));
        assert_eq!(v.path("card.x"), None);
    }
}
