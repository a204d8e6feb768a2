//! Stream entries as read from Redis, and the parsers for `XRANGE` and `XREAD`/`XREADGROUP`
//! replies (read as raw values: fred's typed conversions fail on an empty `BLOCK` timeout).

use fred::bytes_utils::Str;
use fred::types::{Resp3Frame, Value};
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

/// One stream entry with its fields left as the reply's bulk strings: decoding reads them in
/// place (`FieldSource`), without a `String` per field name and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    pub id: EntryId,
    /// Field names and values, alternating, as Redis sent them (checked UTF-8 once, not copied).
    fields: Vec<Str>,
}

impl FieldSource for RawEntry {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.chunks_exact(2).find_map(|pair| match pair {
            [key, value] if &**key == name => Some(&**value),
            _ => None,
        })
    }
}

/// One stream's entries of an `XREAD` reply: its key and its (non-deleted) entries.
pub type RawStream = (Str, Vec<RawEntry>);

/// Parses an `XREAD` reply straight from the protocol frames (fred's `custom_raw`) into
/// entries, for a reader that decodes every entry once and drops it (the gateway's multiplexed
/// reader): the reply's bulk strings become the entries' fields as they are, where the
/// `Value` path builds a second tree of values first. Reads RESP2 arrays and RESP3 maps of
/// streams; a nil reply (the `BLOCK` timed out) is an empty list, an error reply an error.
/// Accepts and refuses exactly what [`parse_xread`] does for replies whose field values are
/// bulk strings, which is all a stream holds.
pub fn parse_xread_frame(frame: Resp3Frame) -> Result<Vec<RawStream>, StreamIoError> {
    match frame {
        Resp3Frame::Null => Ok(Vec::new()),
        Resp3Frame::Array { data: streams, .. } => {
            let mut out = Vec::with_capacity(streams.len());
            for stream in streams {
                let mut parts = match stream {
                    Resp3Frame::Array { data, .. } => data.into_iter(),
                    other => return Err(protocol(format!("stream reply: {other:?}"))),
                };
                let key = frame_text(parts.next().ok_or_else(|| protocol("stream without key"))?)?;
                let entries = frame_entries(parts.next().unwrap_or(Resp3Frame::Null))?;
                out.push((key, entries));
            }
            Ok(out)
        }
        Resp3Frame::Map { data: streams, .. } => {
            let mut out = Vec::with_capacity(streams.len());
            for (key, entries) in streams {
                out.push((frame_text(key)?, frame_entries(entries)?));
            }
            Ok(out)
        }
        Resp3Frame::SimpleError { data, .. } => Err(redis_error(&data)),
        Resp3Frame::BlobError { data, .. } => Err(redis_error(&String::from_utf8_lossy(&data))),
        other => Err(protocol(format!("xread reply: {other:?}"))),
    }
}

/// An error reply, as fred reports one on its `Value` path.
fn redis_error(text: &str) -> StreamIoError {
    StreamIoError::Redis(fred::error::Error::new(
        fred::error::ErrorKind::Unknown,
        text.to_owned(),
    ))
}

/// A string frame's text, its bytes shared with the frame.
fn frame_text(frame: Resp3Frame) -> Result<Str, StreamIoError> {
    match frame {
        Resp3Frame::BlobString { data, .. }
        | Resp3Frame::SimpleString { data, .. }
        | Resp3Frame::VerbatimString { data, .. } => {
            Str::from_inner(data).map_err(|_| protocol("a string that is not UTF-8"))
        }
        other => Err(protocol(format!("expected a string: {other:?}"))),
    }
}

fn frame_entries(frame: Resp3Frame) -> Result<Vec<RawEntry>, StreamIoError> {
    match frame {
        Resp3Frame::Null => Ok(Vec::new()),
        Resp3Frame::Array { data: items, .. } => {
            let mut entries = Vec::with_capacity(items.len());
            for item in items {
                if let Some(entry) = frame_entry(item)? {
                    entries.push(entry);
                }
            }
            Ok(entries)
        }
        other => Err(protocol(format!("entry list: {other:?}"))),
    }
}

fn frame_entry(frame: Resp3Frame) -> Result<Option<RawEntry>, StreamIoError> {
    let mut parts = match frame {
        Resp3Frame::Array { data, .. } => data.into_iter(),
        other => return Err(protocol(format!("entry is not an array: {other:?}"))),
    };
    let id = frame_text(parts.next().ok_or_else(|| protocol("entry without id"))?)?;
    let id = EntryId::parse(&id).map_err(|e| protocol(format!("entry id {id:?}: {e}")))?;
    let fields = match parts.next() {
        // XREADGROUP/XAUTOCLAIM report entries deleted since delivery with nil fields.
        None | Some(Resp3Frame::Null) => return Ok(None),
        Some(Resp3Frame::Array { data: flat, .. }) => {
            if flat.len() % 2 != 0 {
                return Err(protocol("odd number of entry fields"));
            }
            flat.into_iter()
                .map(frame_text)
                .collect::<Result<Vec<_>, _>>()?
        }
        Some(Resp3Frame::Map { data: map, .. }) => {
            let mut flat = Vec::with_capacity(map.len() * 2);
            for (name, value) in map {
                flat.push(frame_text(name)?);
                flat.push(frame_text(value)?);
            }
            flat
        }
        Some(other) => return Err(protocol(format!("entry fields: {other:?}"))),
    };
    Ok(Some(RawEntry { id, fields }))
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
        assert!(
            parse_xread_frame(Resp3Frame::Number {
                data: 3,
                attributes: None
            })
            .is_err()
        );
        let odd = Reply::Array(vec![Reply::Array(vec![
            Reply::text("k"),
            Reply::Array(vec![Reply::Array(vec![
                Reply::text("1-0"),
                Reply::Array(vec![Reply::text("odd")]),
            ])]),
        ])]);
        assert!(parse_xread(odd.value()).is_err());
        assert!(parse_xread_frame(odd.frame()).is_err());
        let not_utf8 = Reply::Array(vec![Reply::Array(vec![
            Reply::text("k"),
            Reply::Array(vec![Reply::Array(vec![
                Reply::text("1-0"),
                Reply::Array(vec![Reply::text("v"), Reply::Blob(vec![0xff, 0xfe])]),
            ])]),
        ])]);
        assert!(parse_xread(not_utf8.value()).is_err());
        assert!(parse_xread_frame(not_utf8.frame()).is_err());
    }

    /// An error reply is a Redis error with its text, not a protocol error or an empty read.
    #[test]
    fn an_error_reply_is_a_redis_error() {
        let reply = Resp3Frame::SimpleError {
            data: "WRONGTYPE Operation against a key holding the wrong kind of value".into(),
            attributes: None,
        };
        assert!(matches!(
            parse_xread_frame(reply),
            Err(StreamIoError::Redis(e)) if e.details().starts_with("WRONGTYPE")
        ));
        let reply = Resp3Frame::BlobError {
            data: "ERR boom".into(),
            attributes: None,
        };
        assert!(matches!(
            parse_xread_frame(reply),
            Err(StreamIoError::Redis(e)) if e.details() == "ERR boom"
        ));
    }

    /// A reply written once and read both ways: as the frames fred's `custom_raw` hands over,
    /// and as the `Value`s its conversion makes of them (a UTF-8 bulk string becomes
    /// `Value::String`, any other `Value::Bytes`).
    #[derive(Clone)]
    enum Reply {
        Blob(Vec<u8>),
        Null,
        Array(Vec<Reply>),
        Map(Vec<(Reply, Reply)>),
    }

    impl Reply {
        fn text(text: &str) -> Self {
            Self::Blob(text.as_bytes().to_vec())
        }

        fn frame(&self) -> Resp3Frame {
            match self {
                Self::Blob(bytes) => Resp3Frame::BlobString {
                    data: bytes.clone().into(),
                    attributes: None,
                },
                Self::Null => Resp3Frame::Null,
                Self::Array(items) => Resp3Frame::Array {
                    data: items.iter().map(Self::frame).collect(),
                    attributes: None,
                },
                Self::Map(pairs) => Resp3Frame::Map {
                    data: pairs.iter().map(|(k, v)| (k.frame(), v.frame())).collect(),
                    attributes: None,
                },
            }
        }

        fn value(&self) -> Value {
            match self {
                Self::Blob(bytes) => match std::str::from_utf8(bytes) {
                    Ok(text) => s(text),
                    Err(_) => Value::Bytes(bytes.clone().into()),
                },
                Self::Null => Value::Null,
                Self::Array(items) => Value::Array(items.iter().map(Self::value).collect()),
                Self::Map(pairs) => {
                    let mut map = fred::types::Map::new();
                    for (key, value) in pairs {
                        let Self::Blob(key) = key else {
                            unreachable!("test maps have string keys")
                        };
                        map.insert(key.as_slice().into(), value.value());
                    }
                    Value::Map(map)
                }
            }
        }
    }

    /// The frame path reads the same fields, in the same order, as the converting one, on every
    /// reply shape Redis sends (RESP2 arrays, RESP3 maps, deleted entries, no reply).
    #[test]
    fn the_frame_parse_reads_what_the_converting_parse_reads() -> Result<(), StreamIoError> {
        let entry = |id: &str, fields: Reply| Reply::Array(vec![Reply::text(id), fields]);
        let flat = Reply::Array(
            [
                "v",
                "1",
                "type",
                "token",
                "content",
                "h\u{e9}llo",
                "v",
                "second value of a repeated name",
            ]
            .into_iter()
            .map(Reply::text)
            .collect(),
        );
        let map = Reply::Map(vec![
            (Reply::text("a"), Reply::text("1")),
            (Reply::text("b"), Reply::text("")),
        ]);
        let stream_entries = Reply::Array(vec![
            entry("1-0", flat),
            entry("2-0", Reply::Null),
            entry("3-5", map),
            entry("4-0", Reply::Array(Vec::new())),
        ]);
        let array_reply = Reply::Array(vec![
            Reply::Array(vec![
                Reply::text("llm:stream:{a}:m"),
                stream_entries.clone(),
            ]),
            Reply::Array(vec![
                Reply::text("llm:stream:{b}:m"),
                Reply::Array(Vec::new()),
            ]),
        ]);
        let map_reply = Reply::Map(vec![(Reply::text("llm:stream:{a}:m"), stream_entries)]);
        for reply in [array_reply, map_reply, Reply::Null] {
            let converted = parse_xread(reply.value())?;
            let raw = parse_xread_frame(reply.frame())?;
            assert_eq!(converted.len(), raw.len());
            for ((key, entries), (raw_key, raw_entries)) in converted.iter().zip(&raw) {
                assert_eq!(key, &**raw_key);
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
        // A repeated name reads as its first value.
        let raw = parse_xread_frame(
            Reply::Array(vec![Reply::Array(vec![
                Reply::text("k"),
                Reply::Array(vec![entry(
                    "7-1",
                    Reply::Array(["v", "1", "v", "2"].into_iter().map(Reply::text).collect()),
                )]),
            ])])
            .frame(),
        )?;
        assert_eq!(raw[0].1[0].id, EntryId { ms: 7, seq: 1 });
        assert_eq!(raw[0].1[0].field("v"), Some("1"));
        Ok(())
    }
}
