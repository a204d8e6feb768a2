//! A script call's keys and arguments, written into one buffer.
//!
//! A combined append carries thousands of arguments (a dozen per event). Built as one `String`
//! each, every argument cost an allocation, and another free when fred dropped the command
//! after its reply; the producer spent about a tenth of its CPU there at paced load. Here each
//! key and argument is a slice of one shared buffer (or a static string, for field names), so a
//! call costs a few allocations whatever its size.

use std::fmt::{self, Write as _};

use bytes::{Bytes, BytesMut};
use fred::types::{Key, Value};
use stream_schema::{FieldSink, SessionEvent};

/// Keys and arguments of one script call, in order.
#[derive(Default)]
pub(crate) struct CallArgs {
    buf: BytesMut,
    keys: Vec<Piece>,
    args: Vec<Piece>,
}

/// Where one key or argument's bytes are.
enum Piece {
    Static(&'static str),
    /// A range of the buffer.
    Written {
        start: usize,
        end: usize,
    },
}

impl CallArgs {
    /// Room for `args` arguments of about `bytes` bytes in all (a hint).
    pub(crate) fn with_capacity(args: usize, bytes: usize) -> Self {
        Self {
            buf: BytesMut::with_capacity(bytes),
            keys: Vec::new(),
            args: Vec::with_capacity(args),
        }
    }

    pub(crate) fn key(&mut self, key: impl fmt::Display) {
        let piece = self.write(key);
        self.keys.push(piece);
    }

    pub(crate) fn arg(&mut self, value: impl fmt::Display) {
        let piece = self.write(value);
        self.args.push(piece);
    }

    pub(crate) fn static_arg(&mut self, value: &'static str) {
        self.args.push(Piece::Static(value));
    }

    /// An event as the append scripts read it: its number of field names and values, then
    /// the names and values.
    pub(crate) fn event(&mut self, event: &SessionEvent) {
        let count_at = self.args.len();
        self.args.push(Piece::Static(""));
        event.write_fields(self);
        let written = self.args.len() - count_at - 1;
        self.args[count_at] = self.write(written);
    }

    /// The event's fields alone, as `XADD` takes them after the id.
    pub(crate) fn fields(&mut self, event: &SessionEvent) {
        event.write_fields(self);
    }

    fn write(&mut self, value: impl fmt::Display) -> Piece {
        let start = self.buf.len();
        // Writing to a `BytesMut` cannot fail; a `Display` that reports an error leaves what it
        // wrote, as `to_string` would have panicked on it instead.
        let _ = write!(self.buf, "{value}");
        Piece::Written {
            start,
            end: self.buf.len(),
        }
    }

    /// The keys and arguments, each a slice of the one buffer.
    pub(crate) fn finish(self) -> (Vec<Key>, Vec<Value>) {
        let buf = self.buf.freeze();
        let bytes = |piece: &Piece| match *piece {
            Piece::Static(text) => Bytes::from_static(text.as_bytes()),
            Piece::Written { start, end } => buf.slice(start..end),
        };
        let keys = self
            .keys
            .iter()
            .map(|piece| Key::from(bytes(piece)))
            .collect();
        let args = self
            .args
            .iter()
            .map(|piece| Value::Bytes(bytes(piece)))
            .collect();
        (keys, args)
    }
}

impl FieldSink for CallArgs {
    fn field(&mut self, name: &'static str, value: impl fmt::Display) {
        self.static_arg(name);
        self.arg(value);
    }
}

#[cfg(test)]
mod tests {
    use fred::types::Value;
    use stream_schema::{RequestId, SessionEvent};

    use super::CallArgs;

    fn text(values: &[Value]) -> Vec<String> {
        values
            .iter()
            .map(|value| value.as_str().map(|s| s.to_string()).unwrap_or_default())
            .collect()
    }

    #[test]
    fn an_event_is_its_field_count_then_the_fields_it_encodes() {
        let event = SessionEvent::Token {
            request_id: RequestId::new(),
            sequence: 7,
            content: "héllo".to_owned(),
            timestamp: 42,
        };
        let mut call = CallArgs::default();
        call.key("llm:stream:a");
        call.arg(3);
        call.event(&event);
        call.static_arg("end");
        let (keys, args) = call.finish();

        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].as_str(), Some("llm:stream:a"));
        let mut expected = vec!["3".to_owned()];
        let fields = event.encode();
        expected.push((fields.len() * 2).to_string());
        for (name, value) in fields {
            expected.push(name.to_owned());
            expected.push(value);
        }
        expected.push("end".to_owned());
        assert_eq!(text(&args), expected);
    }

    #[test]
    fn every_argument_shares_one_buffer() -> anyhow::Result<()> {
        let mut call = CallArgs::with_capacity(4, 64);
        call.arg("first");
        call.arg(12345);
        let (_, args) = call.finish();
        let [Value::Bytes(first), Value::Bytes(second)] = args.as_slice() else {
            anyhow::bail!("two byte arguments expected, got {args:?}");
        };
        // Slices of one allocation: the second starts where the first ends.
        assert_eq!(first.as_ptr().wrapping_add(first.len()), second.as_ptr());
        assert_eq!(&second[..], b"12345");
        Ok(())
    }
}
