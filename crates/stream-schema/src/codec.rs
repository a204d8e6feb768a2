//! Field-level encoding shared by every entry type: the schema version, the field source trait
//! and the typed decode error.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// The newest schema version, written as field `v`; bumped when an entry's meaning changes.
///
/// Version 2 added what a chat carries besides text (tool calls, reasoning, structured
/// messages, sampling options). Writers mark an entry `v=2` only when a version-1 reader would
/// misread it (an event type, finish reason or job field it does not know, which it would
/// reject or silently drop); every other entry stays `v=1`, so a reader of the previous
/// release keeps working on everything that does not use the new features during a rollout.
/// Readers accept every version up to this one.
pub const SCHEMA_VERSION: u32 = 2;

/// The version an entry is written with: the oldest that describes it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Version {
    V1 = 1,
    V2 = 2,
}

/// Field name of the schema version in every entry.
pub(crate) const F_VERSION: &str = "v";

/// An entry ready for `XADD`/`HSET`: ordered field/value pairs.
pub type Fields = Vec<(&'static str, String)>;

/// Where an entry's fields are written, one pair at a time and in order. [`Fields`] collects
/// them as strings; a writer that formats them into one shared buffer (the producer's script
/// calls) spends no allocation per field.
pub trait FieldSink {
    fn field(&mut self, name: &'static str, value: impl fmt::Display);
}

impl FieldSink for Fields {
    fn field(&mut self, name: &'static str, value: impl fmt::Display) {
        self.push((name, value.to_string()));
    }
}

/// Why an entry could not be decoded. Readers log and count it and go on; it never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("field `{field}` is invalid: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("unknown schema version `{0}`")]
    UnknownVersion(String),
    #[error("unknown entry type `{0}`")]
    UnknownType(String),
}

/// Where decoders read fields from: a map or the pair list a stream read returns.
pub trait FieldSource {
    fn field(&self, name: &str) -> Option<&str>;
}

impl FieldSource for HashMap<String, String> {
    fn field(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

impl FieldSource for [(String, String)] {
    fn field(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl FieldSource for Vec<(String, String)> {
    fn field(&self, name: &str) -> Option<&str> {
        self.as_slice().field(name)
    }
}

pub(crate) fn required<'a, S: FieldSource + ?Sized>(
    src: &'a S,
    name: &'static str,
) -> Result<&'a str, DecodeError> {
    src.field(name).ok_or(DecodeError::MissingField(name))
}

pub(crate) fn parsed<T, S>(src: &S, name: &'static str) -> Result<T, DecodeError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
    S: FieldSource + ?Sized,
{
    required(src, name)?
        .parse()
        .map_err(|e: T::Err| DecodeError::InvalidField {
            field: name,
            reason: e.to_string(),
        })
}

pub(crate) fn optional_parsed<T, S>(src: &S, name: &'static str) -> Result<Option<T>, DecodeError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
    S: FieldSource + ?Sized,
{
    match src.field(name) {
        None | Some("") => Ok(None),
        Some(_) => parsed(src, name).map(Some),
    }
}

pub(crate) fn parse_bool<S: FieldSource + ?Sized>(
    src: &S,
    name: &'static str,
) -> Result<bool, DecodeError> {
    match required(src, name)? {
        "1" => Ok(true),
        "0" => Ok(false),
        other => Err(DecodeError::InvalidField {
            field: name,
            reason: format!("expected 0 or 1, got {other:?}"),
        }),
    }
}

pub(crate) fn bool_field(value: bool) -> String {
    if value { "1" } else { "0" }.to_owned()
}

/// Checks the `v` field; every decoder calls it first.
pub(crate) fn check_version<S: FieldSource + ?Sized>(src: &S) -> Result<(), DecodeError> {
    let v = required(src, F_VERSION)?;
    if v == "1" || v == "2" {
        Ok(())
    } else {
        Err(DecodeError::UnknownVersion(v.to_owned()))
    }
}

/// The `v` field of an entry that a version-1 reader reads correctly.
pub(crate) fn version_field() -> (&'static str, String) {
    version_field_for(Version::V1)
}

/// The `v` field of an entry that needs a reader of `version` or later.
pub(crate) fn version_field_for(version: Version) -> (&'static str, String) {
    (F_VERSION, (version as u32).to_string())
}

/// Maps a `FromStr` for snake_case enums with a fixed set of names.
///
/// The names are matched as `tt`, not `literal`: a `literal` fragment reaches derive macros
/// wrapped in an invisible group, which utoipa's parser skips, so `/openapi.json` listed the
/// Rust variant names (`Stop`) instead of the wire names (`stop`).
macro_rules! string_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:tt),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
        $vis enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),*
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)*
                    other => Err(format!("unknown {} `{}`", stringify!($name), other)),
                }
            }
        }
    };
}
pub(crate) use string_enum;

/// Field carrying the W3C `traceparent` of the writer's span, in jobs and event records, so one
/// trace spans gateway → producer → processor. Optional: absent when traces are off.
pub const F_TRACEPARENT: &str = "tp";

/// Adds the `traceparent` field to encoded fields, when there is one.
pub fn with_traceparent(mut fields: Fields, traceparent: Option<String>) -> Fields {
    if let Some(traceparent) = traceparent {
        fields.push((F_TRACEPARENT, traceparent));
    }
    fields
}

/// The `traceparent` field of an entry, if present.
pub fn traceparent<S: FieldSource + ?Sized>(src: &S) -> Option<&str> {
    src.field(F_TRACEPARENT).filter(|tp| !tp.is_empty())
}
