//! The resume position of a session-wide stream over several models: the last entry id the
//! client saw of each model's stream, carried as the SSE `id:` of every event so that
//! `Last-Event-ID` resumes each stream exactly where the client left it.
//!
//! Entry ids of different streams interleave (two streams may both write within one
//! millisecond), so no single id can say where a client stands in two streams at once.
//!
//! Text form: `<modelId>=<entry id>` pairs joined by `,`, in model order, e.g.
//! `gpt-4=1795629159035-0,mock=1795629159020-3`. `=` and `,` never occur in a model id. A model
//! not named is at `0-0` (the client has seen none of its stream). A plain entry id (every
//! request-scoped stream, and a session-wide stream over one model) is not a cursor.

use std::collections::BTreeMap;
use std::fmt;

use crate::ids::{EntryId, IdError, ModelId};

/// Where a client stands in each model stream of a session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionCursor(BTreeMap<ModelId, EntryId>);

impl SessionCursor {
    /// Whether `raw` is written as a cursor (not as a plain entry id).
    pub fn looks_like(raw: &str) -> bool {
        raw.contains('=')
    }

    pub fn parse(raw: &str) -> Result<Self, IdError> {
        let mut positions = BTreeMap::new();
        for pair in raw.split(',') {
            let (model, id) = pair.split_once('=').ok_or(IdError::EntryId)?;
            positions.insert(ModelId::parse(model)?, EntryId::parse(id)?);
        }
        Ok(Self(positions))
    }

    /// The last id seen of `model`'s stream (`0-0`: none).
    pub fn position(&self, model: &ModelId) -> EntryId {
        self.0.get(model).copied().unwrap_or(EntryId::ZERO)
    }

    /// Moves `model`'s position to `id`.
    pub fn advance(&mut self, model: &ModelId, id: EntryId) {
        if id == EntryId::ZERO {
            self.0.remove(model);
        } else {
            self.0.insert(model.clone(), id);
        }
    }
}

impl fmt::Display for SessionCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (model, id)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{model}={id}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_survives_its_text_and_names_only_what_was_seen() -> Result<(), IdError> {
        let (a, b) = (ModelId::parse("gpt-4")?, ModelId::parse("mock:x.1")?);
        let mut cursor = SessionCursor::default();
        cursor.advance(&b, EntryId::parse("1795629159020-3")?);
        cursor.advance(&a, EntryId::parse("1795629159035-0")?);
        let text = cursor.to_string();
        assert_eq!(text, "gpt-4=1795629159035-0,mock:x.1=1795629159020-3");
        assert!(SessionCursor::looks_like(&text));
        assert!(!SessionCursor::looks_like("1795629159035-0"));
        assert_eq!(SessionCursor::parse(&text)?, cursor);
        cursor.advance(&a, EntryId::ZERO);
        assert_eq!(cursor.to_string(), "mock:x.1=1795629159020-3");
        assert_eq!(cursor.position(&a), EntryId::ZERO);
        for bad in [
            "",
            "gpt-4",
            "gpt-4=",
            "=1-0",
            "gpt-4=1-0,",
            "g{x}=1-0",
            "gpt-4=x",
        ] {
            assert!(SessionCursor::parse(bad).is_err(), "{bad}");
        }
        Ok(())
    }
}
