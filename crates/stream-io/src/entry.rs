//! Stream entries as read from Redis, and the parsers for `XRANGE` and `XREAD`/`XREADGROUP`
//! replies (read as raw values: fred's typed conversions fail on an empty `BLOCK` timeout).

use fred::types::Value;
use stream_schema::EntryId;

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
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => {
            let mut entries = Vec::with_capacity(items.len());
            for item in items {
                if let Some(entry) = parse_entry(item)? {
                    entries.push(entry);
                }
            }
            Ok(entries)
        }
        other => Err(protocol(format!("entry list: {other:?}"))),
    }
}

/// Parses an `XREAD`/`XREADGROUP` reply into (stream key, entries). A nil reply (the `BLOCK`
/// timed out) is an empty list.
pub fn parse_xread(value: Value) -> Result<Vec<(String, Vec<Entry>)>, StreamIoError> {
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
                let entries = parse_entries(parts.next().unwrap_or(Value::Null))?;
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
                out.push((key, parse_entries(entries)?));
            }
            Ok(out)
        }
        other => Err(protocol(format!("xread reply: {other:?}"))),
    }
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
    }
}
