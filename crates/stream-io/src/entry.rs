//! Stream entries as read from Redis, and the parsers for `XRANGE` and `XREAD`/`XREADGROUP`
//! replies (read as raw values: fred's typed conversions fail on an empty `BLOCK` timeout).

use fred::types::Value;
use stream_schema::EntryId;
use stream_schema::codec::FieldSource;

use crate::error::StreamIoError;

/// One stream entry: its id and its field/value pairs in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: EntryId,
    pub fields: Vec<(String, String)>,
}

fn protocol(what: impl Into<String>) -> StreamIoError {
    StreamIoError::Protocol(what.into())
}

fn text(value: Value) -> Result<String, StreamIoError> {
    value
        .into_string()
        .ok_or_else(|| protocol("expected a string"))
}

fn parse_entry(value: Value) -> Result<Option<Entry>, StreamIoError> {
    let mut parts = match value {
        Value::Array(parts) => parts.into_iter(),
        other => return Err(protocol(format!("entry is not an array: {other:?}"))),
    };
    let id = parts.next().ok_or_else(|| protocol("entry without id"))?;
    let id = text(id)?;
    let id = EntryId::parse(&id).map_err(|e| protocol(format!("entry id {id:?}: {e}")))?;
    let fields = match parts.next() {
        // XREADGROUP/XAUTOCLAIM report entries deleted since delivery with nil fields.
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(flat)) => {
            let mut pairs = Vec::with_capacity(flat.len() / 2);
            let mut flat = flat.into_iter();
            while let Some(name) = flat.next() {
                let value = flat
                    .next()
                    .ok_or_else(|| protocol("odd number of entry fields"))?;
                pairs.push((text(name)?, text(value)?));
            }
            pairs
        }
        Some(Value::Map(map)) => {
            let mut pairs = Vec::with_capacity(map.len());
            for (name, value) in map.inner() {
                let name = name
                    .into_string()
                    .ok_or_else(|| protocol("field name is not a string"))?;
                pairs.push((name, text(value)?));
            }
            pairs
        }
        Some(other) => return Err(protocol(format!("entry fields: {other:?}"))),
    };
    Ok(Some(Entry { id, fields }))
}

/// Parses an `XRANGE` reply (or the entry list of one stream). Deleted entries are skipped.
pub fn parse_entries(value: Value) -> Result<Vec<Entry>, StreamIoError> {
    entry_list(value, parse_entry)
}

/// Parses an `XREAD`/`XREADGROUP` reply into (stream key, entries). A nil reply (the `BLOCK`
/// timed out) is an empty list.
pub fn parse_xread(value: Value) -> Result<Vec<(String, Vec<Entry>)>, StreamIoError> {
    xread_reply(value, parse_entry)
}

/// An entry list, each entry parsed by `entry` (`None`: a deleted entry, skipped).
fn entry_list<E>(
    value: Value,
    entry: fn(Value) -> Result<Option<E>, StreamIoError>,
) -> Result<Vec<E>, StreamIoError> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => {
            let mut entries = Vec::with_capacity(items.len());
            for item in items {
                if let Some(parsed) = entry(item)? {
                    entries.push(parsed);
                }
            }
            Ok(entries)
        }
        other => Err(protocol(format!("entry list: {other:?}"))),
    }
}

/// An `XREAD` reply (RESP2 array or RESP3 map of streams), each entry parsed by `entry`.
fn xread_reply<E>(
    value: Value,
    entry: fn(Value) -> Result<Option<E>, StreamIoError>,
) -> Result<Vec<(String, Vec<E>)>, StreamIoError> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(streams) => {
            let mut out = Vec::with_capacity(streams.len());
            for stream in streams {
                let mut parts = match stream {
                    Value::Array(parts) => parts.into_iter(),
                    other => return Err(protocol(format!("stream reply: {other:?}"))),
                };
                let key = text(parts.next().ok_or_else(|| protocol("stream without key"))?)?;
                let entries = entry_list(parts.next().unwrap_or(Value::Null), entry)?;
                out.push((key, entries));
            }
            Ok(out)
        }
        Value::Map(map) => {
            let mut out = Vec::with_capacity(map.len());
            for (key, entries) in map.inner() {
                let key = key
                    .into_string()
                    .ok_or_else(|| protocol("stream key is not a string"))?;
                out.push((key, entry_list(entries, entry)?));
            }
            Ok(out)
        }
        other => Err(protocol(format!("xread reply: {other:?}"))),
    }
}

/// One stream entry with its fields left as the reply's values: decoding reads them in place
/// (`FieldSource`), without a `String` per field name and value.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEntry {
    pub id: EntryId,
    /// Field names and values, alternating, as Redis sent them.
    fields: Vec<Value>,
}

impl FieldSource for RawEntry {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.chunks_exact(2).find_map(|pair| match pair {
            [key, value] if str_of(key) == Some(name) => str_of(value),
            _ => None,
        })
    }
}

/// A bulk string's text (fred gives `String` for UTF-8 replies, `Bytes` otherwise).
fn str_of(value: &Value) -> Option<&str> {
    match value {
        Value::String(text) => Some(text),
        Value::Bytes(bytes) => std::str::from_utf8(bytes).ok(),
        _ => None,
    }
}

fn parse_raw_entry(value: Value) -> Result<Option<RawEntry>, StreamIoError> {
    let mut parts = match value {
        Value::Array(parts) => parts.into_iter(),
        other => return Err(protocol(format!("entry is not an array: {other:?}"))),
    };
    let id = parts.next().ok_or_else(|| protocol("entry without id"))?;
    let id = str_of(&id).ok_or_else(|| protocol("expected a string"))?;
    let id = EntryId::parse(id).map_err(|e| protocol(format!("entry id {id:?}: {e}")))?;
    let fields = match parts.next() {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(flat)) => {
            if flat.len() % 2 != 0 {
                return Err(protocol("odd number of entry fields"));
            }
            if let Some(bad) = flat.iter().find(|v| str_of(v).is_none()) {
                return Err(protocol(format!("entry field is not a string: {bad:?}")));
            }
            flat
        }
        Some(Value::Map(map)) => {
            let mut flat = Vec::with_capacity(map.len() * 2);
            for (name, value) in map.inner() {
                if str_of(&value).is_none() {
                    return Err(protocol("expected a string"));
                }
                flat.push(Value::String(
                    name.into_string()
                        .ok_or_else(|| protocol("field name is not a string"))?
                        .into(),
                ));
                flat.push(value);
            }
            flat
        }
        Some(other) => return Err(protocol(format!("entry fields: {other:?}"))),
    };
    Ok(Some(RawEntry { id, fields }))
}

/// [`parse_xread`] without converting the fields: each entry keeps the reply's own values
/// (moved, not copied), for a reader that decodes every entry once and drops it (the
/// gateway's multiplexed reader). Accepts and refuses exactly what `parse_xread` does for
/// replies whose field values are bulk strings, which is all a stream holds.
pub fn parse_xread_raw(value: Value) -> Result<Vec<(String, Vec<RawEntry>)>, StreamIoError> {
    xread_reply(value, parse_raw_entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Value {
        Value::String(text.into())
    }

    #[test]
    fn parses_an_xread_reply_and_skips_deleted_entries() -> Result<(), StreamIoError> {
        let reply = Value::Array(vec![Value::Array(vec![
            s("llm:stream:{a}:m"),
            Value::Array(vec![
                Value::Array(vec![s("1-0"), Value::Array(vec![s("v"), s("1")])]),
                Value::Array(vec![s("2-0"), Value::Null]),
            ]),
        ])]);
        let parsed = parse_xread(reply)?;
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, "llm:stream:{a}:m");
        assert_eq!(
            parsed[0].1,
            vec![Entry {
                id: EntryId { ms: 1, seq: 0 },
                fields: vec![("v".to_owned(), "1".to_owned())],
            }]
        );
        assert!(parse_xread(Value::Null)?.is_empty());
        Ok(())
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        assert!(parse_entries(s("nope")).is_err());
        assert!(parse_entries(Value::Array(vec![Value::Array(vec![s("x-y")])])).is_err());
        assert!(
            parse_entries(Value::Array(vec![Value::Array(vec![
                s("1-0"),
                Value::Array(vec![s("odd")])
            ])]))
            .is_err()
        );
        assert!(parse_xread(Value::Integer(3)).is_err());
        assert!(parse_xread_raw(Value::Integer(3)).is_err());
        assert!(
            parse_xread_raw(Value::Array(vec![Value::Array(vec![
                s("k"),
                Value::Array(vec![Value::Array(vec![
                    s("1-0"),
                    Value::Array(vec![s("odd")])
                ])])
            ])]))
            .is_err()
        );
    }

    /// The raw path reads the same fields, in the same order, as the converting one, on every
    /// reply shape Redis sends (RESP2 arrays, RESP3 maps, binary-safe values, deleted entries).
    #[test]
    fn the_raw_parse_reads_what_the_converting_parse_reads() -> Result<(), StreamIoError> {
        let entry = |id: &str, fields: Value| Value::Array(vec![s(id), fields]);
        let flat = Value::Array(vec![
            s("v"),
            s("1"),
            s("type"),
            s("token"),
            s("content"),
            Value::Bytes("h\u{e9}llo".as_bytes().to_vec().into()),
            s("v"),
            s("second value of a repeated name"),
        ]);
        let mut map = fred::types::Map::new();
        map.insert("a".into(), s("1"));
        map.insert("b".into(), s(""));
        let stream_entries = Value::Array(vec![
            entry("1-0", flat),
            entry("2-0", Value::Null),
            entry("3-5", Value::Map(map)),
            entry("4-0", Value::Array(Vec::new())),
        ]);
        let array_reply = Value::Array(vec![
            Value::Array(vec![s("llm:stream:{a}:m"), stream_entries.clone()]),
            Value::Array(vec![s("llm:stream:{b}:m"), Value::Array(Vec::new())]),
        ]);
        let mut by_key = fred::types::Map::new();
        by_key.insert("llm:stream:{a}:m".into(), stream_entries);
        for reply in [array_reply, Value::Map(by_key), Value::Null] {
            let converted = parse_xread(reply.clone())?;
            let raw = parse_xread_raw(reply)?;
            assert_eq!(converted.len(), raw.len());
            for ((key, entries), (raw_key, raw_entries)) in converted.iter().zip(&raw) {
                assert_eq!(key, raw_key);
                assert_eq!(entries.len(), raw_entries.len());
                for (entry, raw_entry) in entries.iter().zip(raw_entries) {
                    assert_eq!(entry.id, raw_entry.id);
                    for (name, _) in &entry.fields {
                        assert_eq!(entry.fields.field(name), raw_entry.field(name), "{name}");
                    }
                    assert_eq!(raw_entry.field("missing"), None);
                    assert_eq!(raw_entry.fields.len(), entry.fields.len() * 2);
                }
            }
        }
        Ok(())
    }
}
